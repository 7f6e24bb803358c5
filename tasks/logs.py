"""Logging: the ``comat`` command's console and debug log, and the project's log lines in the Prefect run
they belong to, with a quiet worker console.

``setup_logging()`` is what ``comat`` sets up before any command: one line per record on the console
(tracebacks too with ``-v``) and, for ``run``, a debug log with every record and its traceback
(``<cache>/logs/run-*.log``, ``last-run.log`` the newest). Importing this module imports no Prefect:
every command, a fully cached ``comat run`` included, sets up its logging here.

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
import functools
import logging
import os
import shutil
import sys
import time

from comat_core.store.credentials import add_redaction

PROJECT_LOGGER = "comat"


# ---------------------------------------------------------------- the comat command's console and debug log

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _NoTraceback(logging.Formatter):
    """Console lines without the traceback a record carries (it goes to the debug log instead)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _not_on_console(record: logging.LogRecord) -> bool:
    """Keep off the console (the debug log and the Prefect run log still have them): Prefect's advice to
    start a dedicated server, printed by every run on its temporary one, and the flow's per-stage rows,
    which ``comat run`` prints itself, once, at the end."""
    if record.name == "prefect" and str(record.msg).startswith("Starting temporary server"):
        return False
    return not (record.name == "comat.flows" and record.msg == STAGE_ROW_FORMAT)


STAGE_ROW_FORMAT = "%-16s %-8s %s %s"  # flows/pipeline.py's publish_run_summary
DEBUG_LOGS_KEPT = 20


def debug_log_path() -> str:
    """Where this ``comat run`` writes every log record with its traceback: ``<cache>/logs/run-<UTC time>-<pid>.log``,
    one file per run (concurrent runs included); ``<cache>/logs/last-run.log`` links to the newest."""
    from comat_core.models.loader import cache_dir

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return str(cache_dir() / "logs" / f"run-{stamp}-{os.getpid()}.log")


def link_last_run(path: str, keep: int = DEBUG_LOGS_KEPT) -> None:
    """Point ``last-run.log`` at ``path`` (a copy where links are refused) and keep only the newest ``keep`` run logs."""
    folder = os.path.dirname(path)
    last, tmp = os.path.join(folder, "last-run.log"), os.path.join(folder, f".last-run-{os.getpid()}")
    try:
        try:
            os.symlink(os.path.basename(path), tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, last)
        runs = sorted(n for n in os.listdir(folder) if n.startswith("run-") and n.endswith(".log"))
        for old in runs[:-keep]:
            os.remove(os.path.join(folder, old))
    except OSError:
        pass  # the run's own log is written; only the link or the pruning failed


def setup_logging(verbose: bool, command: str) -> str | None:
    """Console: one line per record (tracebacks too with ``-v``). ``run`` also writes the debug log,
    tracebacks included, so an error shows as one line and its details stay one file away. Both mask
    environment credentials (``comat_core/store/credentials.py``)."""
    root = logging.getLogger()
    drop_logging()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(LOG_FORMAT) if verbose else _NoTraceback(LOG_FORMAT))
    console.addFilter(_not_on_console)
    console.comat = True
    root.addHandler(add_redaction(console))
    if command != "run":
        return None
    path = debug_log_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    except OSError:
        return None  # no debug log on a read-only home: the console still has the one-line errors
    link_last_run(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.comat = True
    root.addHandler(add_redaction(handler))
    return path


def drop_logging() -> None:
    """Remove the handlers ``setup_logging`` added: a ``main()`` called in-process (tests, notebooks) must not
    leave a handler on a stream its caller may close."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "comat", False)]:
        root.removeHandler(old)
        old.close()


# ---------------------------------------------------------------- the project's lines in Prefect runs

@functools.cache
def run_log_handler_class() -> type[logging.Handler]:
    """The class of Prefect's API handler, silent outside a run (a project line outside a run is no error);
    made on first use, so that importing this module imports no Prefect."""
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                get_run_context()
            except MissingContextError:
                return
            super().emit(record)

    return RunLogHandler


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
    from prefect.logging.handlers import APILogHandler

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
    handler_class = run_log_handler_class()
    if not any(isinstance(h, handler_class) for h in logger.handlers):
        handler = handler_class()
        handler.setLevel(level)
        logger.addHandler(handler)
    one_line_errors_in_run_logs()
    redact_api_logs()


def redact_api_logs() -> None:
    """Every handler that sends log lines to the Prefect API (ours and Prefect's own run loggers, whose lines
    quote exceptions) masks environment credentials first (``comat_core/store/credentials.py``)."""
    from prefect.logging.handlers import APILogHandler

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
