"""Prefect result storage for the stage tasks' results (the stage URLs), on the artifact store.

A stage task's result is one short string, the stage's URL. Persisting it lets the Prefect UI and
other processes (a parent flow reading a child's result, ``State.result()`` after the run) read it
back. It goes to ``<storage root>/_prefect-results/`` as JSON (never pickle), through a Prefect
filesystem block saved once per storage root:

* a local store: ``LocalFileSystem(basepath=<root>/_prefect-results)``;
* an S3 store: ``BoundedRemoteFileSystem(basepath=s3://bucket/prefix/_prefect-results, settings={endpoint_url})``
  with **no credentials**: s3fs reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or the instance
  role) from the environment of whichever process writes or reads, as ``ArtifactStore`` does; the
  endpoint comes from ``storage.options`` or ``AWS_ENDPOINT_URL``, and is left out when neither sets it.
  The block is a ``BoundedRemoteFileSystem`` (block type ``comat-result-storage``): Prefect writes and
  reads these results itself, so each write or read is bounded here by ``storage.timeout`` and then fails
  with the same one-line ``StorageError`` as the artifact store's own calls (a stalled store would
  otherwise hold the task for minutes: s3fs and botocore retry a timed-out request many times);
* any other store (``memory://``, ``gs://``, ...): no persistence (the task keeps its result in memory).

Caching is unchanged: the stage manifest in storage remains the only cache. Prefect writes a result
only under a key, and a task whose key already holds a record is a Prefect cache hit that skips the
stage; so the key is the task run's own id (``<stage>/<task run id>.json``), which no other run
shares: every run executes, and its result is recorded. A persisted result is a record of what a
run returned, never a reason to skip a stage. A stage already complete in storage (a cache hit)
is not persisted at all: a run that recomputes nothing writes nothing into the store.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import RemoteFileSystem

from comat_core.config import ComatConfig
from comat_core.store.storage import ArtifactStore, bounded_call

log = logging.getLogger("comat.results")

RESULTS_DIR = "_prefect-results"
SERIALIZER = "json"
RESULT_KEY = "{parameters[stage]}/{task_run.id}.json"  # unique per task run: never a Prefect cache hit
# what a block may carry over from storage.options: where the store is, never who may read it
_S3_SETTINGS = ("endpoint_url",)


def persisting(task, cfg: ComatConfig):
    """``task`` with its result persisted on the artifact store (unchanged when the store has no place for it)."""
    storage = result_storage(cfg)
    if storage is None:
        return task
    return task.with_options(persist_result=True, result_storage=storage, result_serializer=SERIALIZER,
                             result_storage_key=RESULT_KEY, cache_policy=None)


def result_storage(cfg: ComatConfig):
    """The Prefect filesystem for this config's task results, or None when the store is neither local nor S3."""
    store = ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout)
    if store.is_local:
        return _saved("local", store.path(RESULTS_DIR), "{}")
    if store.url().startswith("s3://"):
        settings = json.dumps(s3_settings(cfg.storage.options), sort_keys=True)
        return _saved("s3", store.url(RESULTS_DIR), settings, store.timeout)
    return None


def s3_settings(options: dict) -> dict:
    """fsspec settings of the result block: the endpoint only (from the options or the environment)."""
    endpoint = (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    return {"endpoint_url": endpoint} if endpoint else {}


def block_name(kind: str, basepath: str, settings: str) -> str:
    """A stable block name per (kind, basepath, settings): ``comat-results-<12 hex>``."""
    return "comat-results-" + hashlib.sha256(f"{kind}\0{basepath}\0{settings}".encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=16)
def _saved(kind: str, basepath: str, settings: str, timeout: float = 0):
    """The block, saved once per process (so result records point at it by id); unsaved if the API refuses."""
    from prefect.filesystems import LocalFileSystem

    if kind == "local":
        block = LocalFileSystem(basepath=basepath)
    else:
        block = BoundedRemoteFileSystem(basepath=basepath, settings=json.loads(settings), timeout=timeout)
    try:
        block.save(block_name(kind, basepath, settings), overwrite=True)
    except Exception as e:  # noqa: BLE001 - results still persist through the unsaved block
        log.warning("could not save the result storage block for %s (%s: %s); results are written but "
                    "not registered with the server", basepath, type(e).__name__, e)
    return block


class BoundedRemoteFileSystem(RemoteFileSystem):
    """Prefect's ``RemoteFileSystem`` whose reads and writes give up after ``timeout`` seconds
    (storage.timeout; 0: unbounded) with the artifact store's one-line ``StorageError``."""

    _block_type_name = "Comat Result Storage"
    _block_type_slug = "comat-result-storage"
    timeout: float = 0.0

    def _read(self, path: str) -> bytes:
        parent = functools.partial(RemoteFileSystem.read_path, self, path, _sync=True)
        return bounded_call("read", self._resolve_path(path), self.timeout, parent)

    def _write(self, path: str, content: bytes) -> str:
        parent = functools.partial(RemoteFileSystem.write_path, self, path, content, _sync=True)
        return bounded_call("write", self._resolve_path(path), self.timeout, parent)

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self._read, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self._write, path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)
