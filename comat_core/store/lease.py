"""One writer per stage key: a lease object in the store, with an expiry the holder keeps renewing.

Two runs on the same storage (two pipelines, a deployment run beside ``comat run``) would otherwise
compute the same stage key at once and write the same shards. Before computing, ``run_stage`` takes
``<root>/_leases/<stage>-<key>.json``; the other run waits (logging who holds it) and, once the
lease is released, finds the manifest and is a cache hit. A holder that dies stops renewing: its
lease expires after ``ttl`` seconds and the next run takes it over (its committed shards and
checkpoints are kept as always).

A lease need not wait for its expiry when its holder is known to be gone. The lease records the
holder's host (hostname and kernel boot id), pid, the process's start time and a token of the
holding process. It is taken over at once (an INFO line says so) when

* it was written on this host and its pid is gone (``os.kill(pid, 0)``), or now belongs to another
  process (a different start time: the pid was reused), e.g. a ``comat run`` killed with ``kill -9``;
* it belongs to this very process but no live lease object holds it: a failed attempt of this run
  (a Prefect retry) could not delete it, e.g. because the store stalled.

A lease of another host cannot be checked that way; it expires ``ttl`` seconds (300) after its last
renewal. Every read, write and delete of a lease on an object store is bounded by ``storage.timeout``.

Creation is exclusive: a hard link of the complete body on a local disk; on object stores a conditional PUT
(``If-None-Match: *``, S3 and S3-compatible stores), or where a store refuses that, write then read
back and keep the lease only when it still carries this holder's token. The lease lives outside the
stage folder, so ``--force`` (which deletes that folder) runs under it too. Fan-out parts of one
stage write disjoint shards and lease their part (``<stage>-<key>.part-k-n``), not the whole key.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

from comat_core.errors import StorageError

log = logging.getLogger("comat.lease")

LEASE_DIR = "_leases"
TTL_SECONDS = 300.0
POLL_SECONDS = 2.0
PROCESS_TOKEN = uuid.uuid4().hex  # this process, as its leases name it (a pid alone may be reused)
_HELD: set[str] = set()  # tokens of the leases live lease objects of this process hold


def _boot_id() -> str:
    """The kernel's boot id ('' where there is none): a host id that changes when the machine reboots."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def host_id() -> str:
    """``<hostname>/<boot id>``: pids recorded under the same host id can be checked here."""
    return f"{socket.gethostname()}/{_boot_id()}"


def process_started(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('' when unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int, started: str = "") -> bool:
    """True when process ``pid`` on this host still runs (and, when ``started`` is known, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    now = process_started(pid)
    return not (started and now and now != started)


def gone_holder(held: dict) -> str | None:
    """Why the holder of ``held`` is known to be gone (a sentence), or None when it may still be alive."""
    if held.get("owner") == PROCESS_TOKEN:
        return None if held.get("token") in _HELD else "an earlier attempt of this process"
    if held.get("host_id") != host_id() or not isinstance(held.get("pid"), int):
        return None  # another machine: only the expiry tells
    if held["pid"] == os.getpid():
        return "a process that is gone (its pid is now this process's)"
    if not pid_alive(held["pid"], str(held.get("started") or "")):
        return "a process that is gone"
    return None


def describe(held: dict) -> str:
    """``pid 123 on host since 2026-01-01 12:00:00 UTC`` for logs and ``comat status``."""
    try:
        when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(float(held["since"])))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):  # an older or foreign lease file
        when = ""
    return f"pid {held.get('pid')} on {held.get('host')}{when}"


class StageLease:
    """The lease on one stage key (see the module docstring)."""

    def __init__(self, store, stage: str, key: str, part: str = "", ttl: float = TTL_SECONDS):
        self.store, self.stage, self.key, self.ttl = store, stage, key, ttl
        self.name = f"{stage}-{key}" + (f".part-{part}" if part else "")
        self.path = store.path(LEASE_DIR, f"{self.name}.json")
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the lease object
    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "owner": PROCESS_TOKEN, "host": socket.gethostname(),
                           "host_id": host_id(), "pid": os.getpid(), "started": process_started(os.getpid()),
                           "since": self.since, "stage": self.stage, "key": self.key,
                           "expires": time.time() + self.ttl}).encode()

    def holder(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as expired
            return {"expires": 0}

    def _create(self) -> bool:
        """Create the lease object if it does not exist; True when this holder has it."""
        fs = self.store.fs
        if self.store.is_local:  # the whole body appears at once: a hard link fails if the name exists
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{self.token}"
            with open(tmp, "wb") as f:
                f.write(self._body())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
            return True
        if self.store.exists(self.path):
            return False
        write = self.store._remote  # bounded by storage.timeout, like every other remote call
        try:
            write("lease write", self.path, fs.pipe_file, self.path, self._body(), IfNoneMatch="*")
        except TypeError:  # a filesystem without conditional writes: write, then check below
            write("lease write", self.path, fs.pipe_file, self.path, self._body())
        except StorageError as e:
            if _precondition_failed(e):
                return False
            raise
        except Exception as e:  # noqa: BLE001 - botocore/aiobotocore errors carry the status in the text
            if isinstance(e, FileExistsError) or _precondition_failed(e):
                return False
            raise StorageError(f"cannot write the lease {self.path}: {type(e).__name__}: {e}") from None
        time.sleep(0.2)  # a store that ignored the condition: the last writer wins, the others see it
        return (self.holder() or {}).get("token") == self.token

    def try_acquire(self) -> bool:
        if not self._create() and not self._take_over():
            return False
        _HELD.add(self.token)
        return True

    def _take_over(self) -> bool:
        """Create the lease in place of one that was released meanwhile, expired, or whose holder is gone."""
        held = self.holder()
        if held is not None:
            gone = gone_holder(held)
            expired = float(held.get("expires", 0)) < time.time()
            if not (gone or expired):
                return False
            if (self.holder() or {}).get("token") != held.get("token"):
                return False  # another waiter took it over first
            if gone:
                log.info("%s: held by %s, %s; taking the lease over now", self.name, describe(held), gone)
            else:
                log.warning("%s: lease of %s expired; taking over", self.name, describe(held))
            self._remove()
        return self._create()

    def _remove(self) -> None:
        try:
            if self.store.is_local:
                os.remove(self.path)
            else:
                self.store._remote("lease delete", self.path, self.store.fs.rm, self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ renewing and releasing
    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                held = self.holder()
                if not held or held.get("token") != self.token:
                    log.error("%s: lost the lease (taken over after it expired?)", self.name)
                    return
                self.store.write_bytes(self.path, self._body())
            except StorageError as e:
                log.warning("%s: could not renew the lease: %s", self.name, e)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease. A store that fails or stalls here is logged, not raised (the
        stage's own error, if any, is what counts): this process's next attempt takes the lease over at
        once, any other run after its expiry."""
        self._stop.set()
        _HELD.discard(self.token)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self.holder() or {}).get("token") == self.token:
                self._remove()
        except StorageError as e:
            log.warning("%s: could not delete the lease (%s); this process takes it over on its next attempt, "
                        "other runs after it expires", self.name, e)


def _precondition_failed(e: BaseException) -> bool:
    """The store refused a conditional create because the lease exists (HTTP 412)."""
    text = str(e)
    return "PreconditionFailed" in text or "Precondition Failed" in text or "(412)" in text


def holders(store, stage: str, key: str) -> list[dict]:
    """The leases on ``stage``/``key`` (the whole key and its fan-out parts), each with ``name`` added."""
    out = []
    for name in store.listdir(store.path(LEASE_DIR)):
        if name.endswith(".json") and (name == f"{stage}-{key}.json" or name.startswith(f"{stage}-{key}.part-")):
            try:
                held = json.loads(store.read_bytes(store.path(LEASE_DIR, name)))
            except (FileNotFoundError, ValueError):
                continue
            if isinstance(held, dict):
                out.append(held | {"name": name[:-5]})
    return out


@contextmanager
def stage_lease(store, stage: str, key: str, part: str = "", *, done: Callable[[], bool] = lambda: False,
                ttl: float = TTL_SECONDS, poll: float = POLL_SECONDS, wait: float | None = None) -> Iterator[bool]:
    """Hold the stage key's lease for the block; yields False when ``done()`` became true while
    waiting (another run completed the stage: nothing to compute). ``wait`` (seconds, None: no limit)
    bounds the wait; past it, a one-line StorageError names the holder."""
    lease = StageLease(store, stage, key, part, ttl)
    start, last_note = time.time(), 0.0
    while not lease.try_acquire():
        if done():
            yield False
            return
        who = describe(lease.holder() or {})
        if wait is not None and time.time() - start > wait:
            raise StorageError(f"{stage} {key} is being computed by {who} (lease {lease.path}); waited "
                               f"{wait:.0f} s: rerun when it is done, or delete the lease if that run is gone")
        if time.time() - last_note > 60:
            log.info("%s: key %s is being computed by %s; waiting for it (lease %s)", stage, key, who, lease.path)
            last_note = time.time()
        time.sleep(poll)
    lease.start_renewing()
    try:
        yield not done()
    finally:
        lease.release()
