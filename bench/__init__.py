"""Measuring: matrices of cells, each run in its own process, recorded as immutable results."""

__version__ = "0.1.0"
