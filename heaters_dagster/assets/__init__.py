"""Software-defined assets, one per stage of the stage table (built by ``factory.py``)."""
