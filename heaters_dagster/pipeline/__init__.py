"""Stage glue without Dagster: item snapshots, stage outputs and the per-stage handlers that call
the pure media functions. The generic executor (``resources/executor.py``) runs them."""
