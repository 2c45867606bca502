"""Step Station: run Step-3.7-Flash on one DGX Station."""

__version__ = "0.1.0"
