"""The project's log lines in the Prefect run they belong to, and a quiet worker console.

``forward_to_runs()`` attaches one handler to the ``comat`` logger (every module of the project logs
under it): inside a flow or task run a record also goes to the Prefect API, so the run's page in the
UI (and ``prefect flow-run logs``) shows the stage lines (computing or cache hit, shards to do and
resumed, progress every 10 %, each logged training step, parts of a fan-out), not only state changes.
Outside a run the handler does nothing; the console shows the same lines through the usual logging
set-up (``comat run`` prints them).

``quiet_libraries()`` keeps the console of a worker readable: no tqdm bars when the output is not a
terminal (they would interleave) and only errors from transformers and diffusers (their per-model
notices are noise in a pipeline log). ``COMAT_LIBRARY_LOGS=1`` leaves the libraries as they are.
"""

from __future__ import annotations

import logging
import os
import sys

from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from comat_core.store.credentials import add_redaction

PROJECT_LOGGER = "comat"


class RunLogHandler(APILogHandler):
    """Prefect's API handler, silent outside a run (a project line outside a run is no error)."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import get_run_context

        try:
            get_run_context()
        except MissingContextError:
            return
        super().emit(record)


def forward_to_runs(level: int = logging.INFO) -> None:
    """Send the ``comat`` loggers' records at ``level`` and above to the current Prefect run (idempotent)."""
    logger = logging.getLogger(PROJECT_LOGGER)
    if logger.getEffectiveLevel() > level:  # a worker's root logger is at WARNING; comat run -v stays at DEBUG
        logger.setLevel(level)
    if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
        handler = RunLogHandler()
        handler.setLevel(level)
        logger.addHandler(handler)
    redact_api_logs()


def redact_api_logs() -> None:
    """Every handler that sends log lines to the Prefect API (ours and Prefect's own run loggers, whose lines
    quote exceptions) masks environment credentials first (``comat_core/store/credentials.py``)."""
    for logger in [logging.getLogger(), *[v for v in logging.Logger.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger)]]:
        for handler in logger.handlers:
            if isinstance(handler, APILogHandler):
                add_redaction(handler)


def quiet_libraries() -> None:
    """No progress bars off a terminal, only errors from transformers and diffusers (see the module docstring)."""
    if os.environ.get("COMAT_LIBRARY_LOGS") == "1":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        if not sys.stderr.isatty():
            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass
