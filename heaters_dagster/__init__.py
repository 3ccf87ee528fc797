"""Heaters: video-clip curation as a Dagster asset graph."""

__version__ = "0.1.0"
