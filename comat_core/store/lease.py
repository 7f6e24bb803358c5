"""One writer per stage key: a lease object in the store, with an expiry the holder keeps renewing.

Two runs on the same storage (two pipelines, a deployment run beside ``comat run``) would otherwise
compute the same stage key at once and write the same shards. Before computing, ``run_stage`` takes
``<root>/_leases/<stage>-<key>.json``; the other run waits (logging who holds it) and, once the
lease is released, finds the manifest and is a cache hit. A holder that dies stops renewing: its
lease expires after ``ttl`` seconds and the next run takes it over (its committed shards and
checkpoints are kept as always).

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


class StageLease:
    """The lease on one stage key (see the module docstring)."""

    def __init__(self, store, stage: str, key: str, part: str = "", ttl: float = TTL_SECONDS):
        self.store, self.stage, self.key, self.ttl = store, stage, key, ttl
        self.name = f"{stage}-{key}" + (f".part-{part}" if part else "")
        self.path = store.path(LEASE_DIR, f"{self.name}.json")
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the lease object
    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "stage": self.stage, "key": self.key, "expires": time.time() + self.ttl}).encode()

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
        try:
            fs.pipe_file(self.path, self._body(), IfNoneMatch="*")
        except TypeError:  # a filesystem without conditional writes: write, then check below
            fs.pipe_file(self.path, self._body())
        except Exception as e:  # noqa: BLE001 - botocore/aiobotocore errors carry the status in the text
            if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise StorageError(f"cannot write the lease {self.path}: {type(e).__name__}: {e}") from None
        time.sleep(0.2)  # a store that ignored the condition: the last writer wins, the others see it
        return (self.holder() or {}).get("token") == self.token

    def try_acquire(self) -> bool:
        if self._create():
            return True
        held = self.holder()
        if held is None or float(held.get("expires", 0)) < time.time():  # released meanwhile, or expired
            if held is not None:
                if (self.holder() or {}).get("token") != held.get("token"):
                    return False  # another waiter took it over first
                log.warning("%s: lease of %s@%s expired; taking over", self.name, held.get("pid"), held.get("host"))
                self._remove()
            return self._create()
        return False

    def _remove(self) -> None:
        try:
            self.store.fs.rm(self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ renewing and releasing
    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            held = self.holder()
            if not held or held.get("token") != self.token:
                log.error("%s: lost the lease (taken over after it expired?)", self.name)
                return
            try:
                self.store.write_bytes(self.path, self._body())
            except StorageError as e:
                log.warning("%s: could not renew the lease: %s", self.name, e)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.holder() or {}).get("token") == self.token:
            self._remove()


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
        held = lease.holder() or {}
        who = f"pid {held.get('pid')} on {held.get('host')}"
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
