"""Shared test setup: offline, one torch thread, a per-session model cache.

Tests never reach a model hub (HF_HUB_OFFLINE=1); tiny models are built from configs in code into
``COMAT_CACHE`` (a per-session temp folder unless the caller sets one).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session", autouse=True)
def comat_cache(tmp_path_factory):
    """Tiny models are built once per session into this folder (or into $COMAT_CACHE if set)."""
    if os.environ.get("COMAT_CACHE"):
        yield os.environ["COMAT_CACHE"]
        return
    path = tmp_path_factory.mktemp("comat-cache")
    os.environ["COMAT_CACHE"] = str(path)
    yield str(path)
