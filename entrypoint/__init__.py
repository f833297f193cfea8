"""Serve an MLServer model inside the conda-pack environment it was trained in."""

__version__ = "0.1.0"
