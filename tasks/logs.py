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

import copy
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


def explained(exc: BaseException | None) -> bool:
    """An error comat already explains in one line (a ``ComatError``), or one raised from it."""
    from comat_core.errors import ComatError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ComatError):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class OneLineForExplainedErrors(logging.Filter):
    """On a run-log handler: a record carrying an explained error (``explained``) goes to the run's
    logs as its first line, without the traceback; Prefect's engine logs every failure with one (a
    stage failure gave six chained tracebacks in the UI). The record itself is left whole, so the
    other handlers (``comat run``'s debug log, a worker's console) still get the traceback."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and explained(record.exc_info[1])):
            return True
        error = record.exc_info[1]
        text, said = _first_line(record.getMessage()), _first_line(str(error))
        if said and said[:60] not in text:  # e.g. "Engine execution exited with unexpected exception"
            text = f"{text}: {type(error).__name__}: {said}"
        line = copy.copy(record)
        line.msg, line.args = text, None
        line.exc_info = line.exc_text = line.stack_info = None
        self.handler.emit(line)
        return False


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def one_line_errors_in_run_logs() -> None:
    """``OneLineForExplainedErrors`` on the API handlers of Prefect's run loggers and ours (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", PROJECT_LOGGER):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler) and not any(
                    isinstance(f, OneLineForExplainedErrors) for f in handler.filters):
                handler.addFilter(OneLineForExplainedErrors(handler))


def forward_to_runs(level: int = logging.INFO) -> None:
    """Send the ``comat`` loggers' records at ``level`` and above to the current Prefect run (idempotent);
    an error comat explains reaches the run's logs as one line (``OneLineForExplainedErrors``)."""
    logger = logging.getLogger(PROJECT_LOGGER)
    if logger.getEffectiveLevel() > level:  # a worker's root logger is at WARNING; comat run -v stays at DEBUG
        logger.setLevel(level)
    if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
        handler = RunLogHandler()
        handler.setLevel(level)
        logger.addHandler(handler)
    one_line_errors_in_run_logs()
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
