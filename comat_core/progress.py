"""How far a long stage is: a tqdm bar on a terminal, plain log lines elsewhere, rate and ETA in both.

Stages report ``ctx.progress(done, total, message)`` (``comat_core.stages.registry``); ``StageProgress``
sits between the stage and the caller's callback (the Prefect progress artifact, ``tasks/``):

* on a terminal (``sys.stderr`` is a tty) it draws a tqdm bar: done/total, rate, elapsed, ETA;
* always, it logs a plain line under ``comat.<stage>`` (``gan_gt: 120/400 30% | elapsed 02:00 | ETA
  04:40 | 1.00 img/s | <message>``) each time another tenth of the work is done, at least every
  ``every_s`` seconds while work goes on, and at the end; on a terminal the line is written above the bar;
* it forwards ``(done, total, message + [timing])`` to the caller's callback, so the UI shows the same
  rate and ETA as the console.

The rate is tqdm's smoothed rate over this run's reports; the first report of a phase is its baseline
(work done before it, e.g. shards committed by an earlier run, does not count as speed). A report with
a smaller ``done`` than the last one starts a new phase (evaluate: generation, then scoring).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

ProgressFn = Callable[[int, int, str], None]
LINE_FORMAT = "{n_fmt}/{total_fmt} {percentage:3.0f}% | elapsed {elapsed} | ETA {remaining} | {rate_fmt}"
UNITS = {"train": "step", "gan_gt": "img", "masks": "img", "evaluate": "shard"}


def timing_text(done: int, total: int, elapsed: float, rate: float | None = None, unit: str = "it",
                fmt: str = LINE_FORMAT) -> str:
    """``done/total pct | elapsed | ETA | rate`` (tqdm's formatting); ETA from ``rate`` (units per second)."""
    from tqdm.std import tqdm

    return " ".join(tqdm.format_meter(done, total or None, elapsed, rate=rate, unit=unit, bar_format=fmt).split())


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


class StageProgress:
    """The progress callback a stage gets (see the module docstring); ``close()`` ends its bar."""

    def __init__(self, stage: str, forward: ProgressFn | None = None, *, terminal: bool | None = None,
                 every_s: float = 60.0, buckets: int = 10, unit: str | None = None):
        self.stage, self.forward, self.every_s, self.buckets = stage, forward, every_s, buckets
        self.terminal = on_terminal() if terminal is None else terminal
        self.unit = unit or UNITS.get(stage, "it")
        self.log = logging.getLogger(f"comat.{stage}")
        self.started = time.time()  # the stage's start: "elapsed" counts loading models too
        self.bar, self.sink, self.phases = None, None, 0
        self.logged_bucket, self.logged_at = -1, 0.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.bar is None or done < self.bar.n or total != self.bar.total:
            self._new_phase(done, total)
        elif done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if message and self.terminal:
            self.bar.set_postfix_str(message[-60:], refresh=False)
        timing = self.timing()
        if self.forward is not None:
            self.forward(done, total, f"{message} [{timing}]".strip())
        self._maybe_log(done, total, timing, message)

    def timing(self) -> str:
        """This phase's ``done/total pct | elapsed | ETA | rate``."""
        from tqdm.std import tqdm

        meter = tqdm.format_meter(**{**self.bar.format_dict, "bar_format": LINE_FORMAT, "postfix": None, "ncols": None})
        return " ".join(meter.split())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def _new_phase(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        self.close()
        # off a terminal the bar still keeps the count and the smoothed rate, but writes nowhere
        self.sink = None if self.terminal else open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self.bar = tqdm(total=total or None, initial=done, desc=self.stage, unit=self.unit,
                        file=sys.stderr if self.terminal else self.sink, dynamic_ncols=self.terminal,
                        mininterval=0.1 if self.terminal else 0.0, smoothing=0.1)
        if self.phases == 0:
            self.bar.start_t = self.started
        self.phases += 1
        self.logged_bucket, self.logged_at = -1, time.time()

    def _maybe_log(self, done: int, total: int, timing: str, message: str) -> None:
        bucket = self.buckets if not total or done >= total else int(self.buckets * done / total)
        now = time.time()
        if bucket > self.logged_bucket and (bucket > 0 or done == total) or now - self.logged_at >= self.every_s:
            self.logged_bucket, self.logged_at = max(bucket, self.logged_bucket), now
            text = message.removeprefix(f"{self.stage}: ")
            line = f"{self.stage}: {timing}" + (f" | {text}" if text else "")
            if self.terminal:
                from tqdm.std import tqdm

                with tqdm.external_write_mode(file=sys.stderr):
                    self.log.info("%s", line)
            else:
                self.log.info("%s", line)
