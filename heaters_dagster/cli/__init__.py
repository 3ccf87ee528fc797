"""The ``heaters`` command line."""
