"""Progress of a long stage: plain lines with rate and ETA when piped, a tqdm bar on a terminal, the
same timing in what the stage's caller (the Prefect progress artifact) receives.

The two console tests run ``comat run --stages gan_gt --part 0/1`` (the stage in the CLI's own process,
no Prefect server) on the smallest tiny run, once piped and once under a pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from comat_core.config import load_config
from comat_core.progress import StageProgress, timing_text
from comat_core.stages.registry import run_stage
from comat_core.store.storage import ArtifactStore
from fast_run import FAST

ROOT = Path(__file__).resolve().parents[1]
PLAIN_LINE = re.compile(r"gan_gt: (\d)/4 \d+% \| elapsed \d\d:\d\d \| ETA (\d\d:\d\d|\?) \| [\d.?]+ ?(img/s|s/img)")


@pytest.fixture(scope="module")
def prompts_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "store"
    run_stage(load_config("tiny", overrides=FAST, extra={"storage": {"root": str(root)}}), ArtifactStore(str(root)),
              "prompts")
    return root


def gan_gt_command(root: Path, seed: int) -> list[str]:
    sets = [a for s in FAST + [f"gan_gt.seed={seed}"] for a in ("--set", s)]
    return [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--storage", str(root),
            "--stages", "gan_gt", "--part", "0/1", *sets]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_a_piped_run_logs_plain_lines_with_rate_and_eta(prompts_root):
    result = subprocess.run(gan_gt_command(prompts_root, 1), capture_output=True, text=True, env=env(), cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [m for m in map(PLAIN_LINE.search, result.stderr.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [2, 4], result.stderr
    assert re.fullmatch(r"\d\d:\d\d", lines[0].group(2))  # an ETA once a rate is known
    assert "\r" not in result.stderr and "█" not in result.stderr  # no bar drawn into a pipe


def test_a_terminal_run_draws_a_tqdm_bar(prompts_root):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen(gan_gt_command(prompts_root, 2), stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, env=env(), cwd=ROOT)
    os.close(follower)
    out = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-2000:]
    text = out.decode(errors="replace")
    # tqdm's bar: "gan_gt:  50%|█████     | 2/4 [00:05<00:04,  2.45s/img, ...]"
    assert re.search(r"gan_gt: +100%\|█+\| 4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(img/s|s/img)", text), text[-3000:]
    assert "\r" in text  # redrawn in place


def test_the_callers_callback_gets_the_same_timing():
    received = []
    display = StageProgress("gan_gt", lambda done, total, message: received.append((done, total, message)),
                            terminal=False)
    for done in (0, 1, 2, 3, 4):
        display(done, 4, "gan_gt: generating")
        time.sleep(0.05)
    display.close()
    assert [r[:2] for r in received] == [(d, 4) for d in range(5)]
    assert re.search(r"generating \[2/4 50% \| elapsed 00:00 \| ETA 00:00 \| [\d.]+img/s\]", received[2][2])
    display = StageProgress("evaluate", lambda *a: received.append(a), terminal=False)
    display(3, 3, "generated")
    display(1, 5, "scored")  # a smaller count: a new phase, with its own total
    assert received[-1][2].startswith("scored [1/5 20%")


def test_training_timing_text():
    assert timing_text(50, 200, 100.0, 0.5, "step", "elapsed {elapsed}, ETA {remaining}, {rate_fmt}") == \
        "elapsed 01:40, ETA 05:00, 2.00s/step"  # tqdm: seconds per step below one step a second
