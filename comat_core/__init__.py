"""comat_core: the CoMat method and its pipeline stages as plain functions (no Prefect here)."""

__version__ = "0.1.0"
