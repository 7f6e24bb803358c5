"""Faults as an operator meets them: a run killed with kill -9, a store that stalls for good, a forced
recompute that fails on an object store. Real parts only: ``comat run`` subprocesses against the test
Prefect server, moto's S3 server, and a TCP proxy in front of moto that can stop answering."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from fast_run import FAST
from services import services  # noqa: F401 - the session fixture

ROOT = Path(__file__).resolve().parents[1]
SETS = [a for s in FAST for a in ("--set", s)]


def s3_root(services, name: str) -> str:
    return f"s3://{services['COMAT_TEST_S3_BUCKET']}/{name}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- kill -9, then a rerun

def comat_run(root: str, *extra: str) -> subprocess.Popen:
    """``comat run`` of prompts and gan_gt as its own process (gan_gt slowed down to be caught mid-stage)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", *SETS, "--set", "gan_gt.num_inference_steps=30",
           "--set", "train.num_inference_steps=30",
           "--storage", root, "--stages", "prompts,gan_gt", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, seen: list[tuple[float, str]], timeout: float = 240) -> float:
    """Read ``proc``'s output into ``seen`` (time read, line) until a line contains ``needle``; that line's time."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        seen.append((time.time(), line))
        if needle in line:
            return time.time()
        assert time.time() < deadline, f"no {needle!r} within {timeout} s:\n{text(seen)[-3000:]}"
    raise AssertionError(f"exited with {proc.wait()} before {needle!r}:\n{text(seen)[-3000:]}")


def text(seen: list[tuple[float, str]]) -> str:
    return "".join(line for _, line in seen)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rerun_after_kill_9_takes_the_dead_runs_lease_and_computes_within_seconds(services, tmp_path, monkeypatch,
                                                                                     where):
    """Before, the rerun waited for the dead run's lease to expire (300 s). Now the lease of a process that
    is gone is taken over at once: the rerun starts computing gan_gt within 10 s of its flow's start, and
    well within 30 s of its own start (about 5 s of it are imports and Prefect's start on an idle machine)."""
    if where == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", services["COMAT_TEST_S3_ENDPOINT"])
    root = str(tmp_path / "store") if where == "local" else s3_root(services, "kill9")
    first, seen = comat_run(root), []
    try:
        wait_for_line(first, "gan_gt: computing", seen)
        time.sleep(1.0)  # mid-stage: the lease is held, shards are being written
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    t0, rerun, seen = time.time(), comat_run(root), []
    try:
        computing = wait_for_line(rerun, "gan_gt: computing", seen)
        seen.append((time.time(), rerun.communicate(timeout=300)[0]))  # the rest, read to the end
        assert rerun.returncode == 0, text(seen)[-3000:]
    finally:
        if rerun.poll() is None:
            rerun.kill()
    out = text(seen)
    flow_start = next(t for t, line in seen if "Beginning flow run" in line)
    print(f"\n{where}: the rerun started computing gan_gt {computing - t0:.1f} s after it was started "
          f"({computing - flow_start:.1f} s after its flow run began)")
    assert f"held by pid {first.pid} on " in out and "a process that is gone; taking the lease over now" in out, out
    assert "being computed by" not in out  # it never waited
    assert computing - flow_start < 10 and computing - t0 < 30, f"{computing - flow_start:.1f} s, {computing - t0:.1f} s"


@pytest.fixture
def one_gpu_slot(services):
    """The ``gpu`` tag limit ``comat deploy --local`` creates, at 1 slot; removed afterwards (shared server)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import GPU_TAG

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=1)
    yield GPU_TAG
    with get_client(sync_client=True) as client:
        try:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            pass


def test_a_rerun_after_kill_9_gets_the_dead_runs_gpu_slot_at_once(services, tmp_path, one_gpu_slot):
    """With a ``gpu`` limit of 1, the killed run's task still holds the slot in Prefect: Prefect frees it
    when the slot's lease expires (60 s after the last renewal, then up to 15 s until its repossessor
    looks), and the rerun's GPU stage queued that long. The rerun frees the slot of a run whose process
    on this host is gone before it submits its GPU stage, and starts computing within 10 s."""
    first, seen = comat_run(str(tmp_path / "store")), []
    try:
        wait_for_line(first, "gan_gt: computing", seen)
        time.sleep(1.0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    t0, rerun, seen = time.time(), comat_run(str(tmp_path / "store")), []
    try:
        computing = wait_for_line(rerun, "gan_gt: computing", seen, timeout=300)
        seen.append((time.time(), rerun.communicate(timeout=300)[0]))
        assert rerun.returncode == 0, text(seen)[-3000:]
    finally:
        if rerun.poll() is None:
            rerun.kill()
    out = text(seen)
    flow_start = next(t for t, line in seen if "Beginning flow run" in line)
    print(f"\ngpu limit 1: the rerun started computing gan_gt {computing - t0:.1f} s after it was started "
          f"({computing - flow_start:.1f} s after its flow run began)")
    assert f"held by pid {first.pid} on this host, a process that is gone" in out, out[-3000:]
    assert computing - flow_start < 10, f"{computing - flow_start:.1f} s"


# ---------------------------------------------------------------- a store that stops answering

class StallProxy:
    """A TCP proxy to ``target`` (host, port) that can stall: from ``stall()`` on, it accepts connections and
    reads requests but answers nothing, on new and open connections alike (a hung endpoint)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.stalled, self.closed = target, threading.Event(), threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.sockets.append(conn)
            if self.stalled.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.stalled.is_set() and not self.closed.is_set():
                    time.sleep(0.05)
                if self.closed.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass

    def stall(self) -> None:
        self.stalled.set()

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass


class Recorded(logging.Handler):
    """The messages one logger emits while this handler is attached."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()


@pytest.fixture
def stalling(services):
    host, port = services["COMAT_TEST_S3_ENDPOINT"].removeprefix("http://").split(":")
    proxy = StallProxy((host, int(port)))
    yield proxy
    proxy.close()


def test_a_stalled_s3_ends_every_call_in_one_line_within_the_timeout_lease_included(services, stalling):
    """With the endpoint hung for good: taking a lease, releasing one, a stage run and Prefect's result
    storage each end within 2 x storage.timeout, in the one-line timeout error (or, for a release, a warning)."""
    from comat_core.config import load_config
    from comat_core.errors import StorageError
    from comat_core.stages.registry import run_stage
    from comat_core.store.lease import StageLease
    from comat_core.store.storage import ArtifactStore
    from tasks.results import result_storage

    timeout = 2.0
    root = s3_root(services, "stall")
    store = ArtifactStore(root, {"endpoint_url": stalling.url}, timeout=timeout)
    held = StageLease(store, "gan_gt", "k")
    assert held.try_acquire()  # the endpoint still answers
    cfg = load_config("tiny", overrides=FAST + [f"storage.timeout={timeout}"],
                      extra={"storage": {"root": root, "options": {"endpoint_url": stalling.url}}})
    results = result_storage(cfg)
    stalling.stall()

    def bounded(call, *args, **kwargs) -> float:
        t0 = time.monotonic()
        call(*args, **kwargs)
        return time.monotonic() - t0

    timeout_line = r"storage (check|read|write|lease write|list) of s3://.* did not finish in 2 s \(storage.timeout\)"
    with pytest.raises(StorageError, match=timeout_line) as e:
        bounded(StageLease(store, "masks", "k").try_acquire)
    assert "\n" not in str(e.value)
    warnings = Recorded("comat.lease")  # (Prefect's logging set-up may have replaced caplog's handler)
    try:
        assert bounded(held.release) <= 2 * timeout + 1
    finally:
        warnings.close()
    assert any("could not delete the lease" in m and "did not finish in 2 s" in m for m in warnings.messages)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=timeout_line):
        run_stage(cfg, ArtifactStore(root, {"endpoint_url": stalling.url}, timeout=timeout), "prompts")
    assert time.monotonic() - t0 <= 2 * timeout + 1
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"storage write of s3://.*_prefect-results/prompts/.*did not finish in 2 s"):
        results.write_path(f"prompts/{uuid.uuid4().hex}.json", b"{}")  # how Prefect persists a task's result
    assert time.monotonic() - t0 <= timeout + 1
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=timeout_line):
        asyncio.run(results.awrite_path(f"prompts/{uuid.uuid4().hex}.json", b"{}"))  # and from async code
    assert time.monotonic() - t0 <= timeout + 1


# ---------------------------------------------------------------- --force on an object store

def test_a_failed_force_on_s3_leaves_the_old_output_whole_and_a_good_one_swaps_it_in(services, monkeypatch):
    from comat_core.config import load_config
    from comat_core.stages.registry import compute_key, run_stage
    from comat_core.store.storage import ArtifactStore

    monkeypatch.setenv("AWS_ENDPOINT_URL", services["COMAT_TEST_S3_ENDPOINT"])
    root = s3_root(services, "force")
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": root}})
    store = ArtifactStore(root)
    for stage in ("prompts", "gan_gt"):
        run_stage(cfg, store, stage)
    key = compute_key(cfg, store, "gan_gt")
    old = store.read_manifest("gan_gt", key)
    with pytest.raises(RuntimeError, match="fail_at_shard=1"):
        run_stage(cfg, store, "gan_gt", force=True, hooks={"fail_at_shard": 1})
    assert store.read_manifest("gan_gt", key) == old  # never deleted, not even for a moment
    store.reader("gan_gt", key).verify()
    assert store.listdir(store.path("gan_gt")) == [key]  # the failed run's staging folder is gone
    res = run_stage(cfg, store, "gan_gt", force=True)
    assert not res.cached and res.manifest["finished_at"] != old["finished_at"]
    assert store.read_manifest("gan_gt", key) == json.loads(json.dumps(res.manifest, default=str))
    store.reader("gan_gt", key).verify()
    assert store.listdir(store.path("gan_gt")) == [key]


def test_a_forced_run_killed_while_swapping_on_s3_is_finished_by_the_next_run(services, monkeypatch):
    """kill -9 between the staged output's commit and the end of its promotion: the key has no manifest,
    the staged folder is complete; the next run finishes the promotion instead of recomputing."""
    from comat_core.config import load_config
    from comat_core.stages.registry import compute_key, run_stage
    from comat_core.store.storage import MANIFEST, ArtifactStore

    monkeypatch.setenv("AWS_ENDPOINT_URL", services["COMAT_TEST_S3_ENDPOINT"])
    root = s3_root(services, "promote")
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": root}})
    store = ArtifactStore(root)
    run_stage(cfg, store, "prompts")
    key = compute_key(cfg, store, "prompts")
    staged = store.path("prompts", f".{key}.staged-0000abcd")
    for f in store.fs.find(store.path("prompts", key)):
        store.fs.copy(f, staged + f[len(store.path("prompts", key)):])
    store.remove_file(store.path("prompts", key, MANIFEST))  # where the killed promotion stopped
    res = run_stage(cfg, store, "prompts")
    assert res.cached and store.read_manifest("prompts", key) is not None
    store.reader("prompts", key).verify()
    assert store.listdir(store.path("prompts")) == [key]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_forced_fan_out_writes_beside_the_old_output_and_swaps_only_when_committed(services, tmp_path,
                                                                                     monkeypatch, where):
    """``--force`` with ``parallelism`` > 1: every run of the fan-out (parts, then the commit) writes into one
    staging folder (``run_stage(staged=...)``). While the parts run, and after one fails, the old output is
    complete and readable and a plain run is a cache hit of it; the commit swaps the new output in."""
    from comat_core.config import load_config
    from comat_core.stages.registry import compute_key, run_stage, staging_folder
    from comat_core.store.shards import ShardPart
    from comat_core.store.storage import ArtifactStore

    if where == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", services["COMAT_TEST_S3_ENDPOINT"])
    root = str(tmp_path / "store") if where == "local" else s3_root(services, "fanout-force")
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": root}})
    store = ArtifactStore(root)
    for stage in ("prompts", "gan_gt"):
        run_stage(cfg, store, stage)
    key = compute_key(cfg, store, "gan_gt")
    old = store.read_manifest("gan_gt", key)
    staged = staging_folder(key)

    def old_output_intact():
        assert store.read_manifest("gan_gt", key) == old
        store.reader("gan_gt", key).verify()

    first = run_stage(cfg, store, "gan_gt", shard_part=ShardPart(0, 2), staged=staged)
    assert first.partial and first.manifest["summary"]["shards_generated"] == 1
    old_output_intact()
    with pytest.raises(RuntimeError, match="fail_at_shard=1"):  # the second part fails (a kill leaves the same)
        run_stage(cfg, store, "gan_gt", shard_part=ShardPart(1, 2), staged=staged, hooks={"fail_at_shard": 1})
    old_output_intact()
    assert run_stage(cfg, store, "gan_gt").cached  # a plain rerun uses the old output, never the staged shards
    assert store.listdir(store.path("gan_gt")) == sorted([key, staged])  # the part's shard is kept for its retry
    with pytest.raises(Exception, match="staging folder"):
        run_stage(cfg, store, "gan_gt", staged=".0123456789abcdef.staged-0000abcd")  # another key's folder
    run_stage(cfg, store, "gan_gt", shard_part=ShardPart(1, 2), staged=staged)  # the retry
    old_output_intact()
    final = run_stage(cfg, store, "gan_gt", staged=staged)  # the commit: verifies the shards, promotes
    assert not final.cached and not final.partial and final.manifest["summary"]["shards_generated"] == 0
    new = store.read_manifest("gan_gt", key)
    assert new["finished_at"] != old["finished_at"] and new["files"] == old["files"]  # the same bytes, recomputed
    store.reader("gan_gt", key).verify()
    assert store.listdir(store.path("gan_gt")) == [key]  # the staging folder became the output


# ---------------------------------------------------------------- leftovers and the debug log

def test_leftovers_of_a_killed_run_are_removed_by_the_next_and_each_run_has_its_own_log(tmp_path, monkeypatch):
    import tempfile

    from comat_core.config import load_config
    from comat_core.stages.registry import compute_key, run_stage, scratch_prefix
    from comat_core.store.storage import ArtifactStore
    from tasks.logs import link_last_run

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    gone = Path(tempfile.mkdtemp(prefix=f"comat-gan_gt-{dead_pid}-"))  # a killed run's scratch folder
    mine = Path(tempfile.mkdtemp(prefix=scratch_prefix("gan_gt")))  # a live one: this process's
    root = tmp_path / "store"
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(root)}})
    store = ArtifactStore(root)
    key = compute_key(cfg, store, "prompts")
    Path(store.path("prompts", key)).mkdir(parents=True)
    tmp_file = Path(store.path("prompts", key, "prompts.parquet.tmp-0123abcd"))
    tmp_file.write_bytes(b"half a file")
    try:
        run_stage(cfg, store, "prompts")
        assert not gone.exists() and mine.exists() and not tmp_file.exists()
    finally:
        for folder in (gone, mine):
            if folder.exists():
                os.rmdir(folder)

    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(4):
        path = logs / f"run-20260101-00000{i}-{100 + i}.log"
        path.write_text(f"run {i}")
        link_last_run(str(path), keep=3)
    assert sorted(p.name for p in logs.glob("run-*.log")) == [f"run-20260101-00000{i}-{100 + i}.log" for i in (1, 2, 3)]
    assert (logs / "last-run.log").read_text() == "run 3"


def test_status_shows_who_holds_a_stage_and_since_when(tmp_path, capsys):
    from comat_core.config import load_config
    from comat_core.stages.registry import compute_key
    from comat_core.store.lease import StageLease
    from comat_core.store.storage import ArtifactStore
    from flows.cli import main

    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(tmp_path)}})
    store = ArtifactStore(tmp_path)
    lease = StageLease(store, "prompts", compute_key(cfg, store, "prompts"))
    assert lease.try_acquire()
    try:
        assert main(["status", "--preset", "tiny", *SETS, "--storage", str(tmp_path)]) == 0
    finally:
        lease.release()
    row = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("prompts")][0]
    since = datetime.utcfromtimestamp(lease.since).strftime("%Y-%m-%d %H:%M:%S")
    assert re.search(rf"held by pid {os.getpid()} on \S+ since {since} UTC", row), row
