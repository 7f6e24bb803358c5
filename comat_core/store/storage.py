"""The artifact store: every stage's output under ``<root>/<stage>/<stage key>/`` on any fsspec URL.

Contract:

* The **stage key** hashes the stage name, the stage's config section, its inputs' content (the
  sha256 list of their files, ``content_digest``) and the stage's code version. Same inputs, same
  key; any change, a new key. When and where an input was made (timings, software versions, all in
  its manifest for the record) never enters a key: two stores that ran the same config share keys,
  and a recomputed stage with identical bytes leaves its dependants cached.
* Every file is written atomically: to a temporary name then renamed (local disk), or in a single
  PUT (object stores), so a reader never sees half a file under its final name.
* ``_manifest.json`` is written **last** and lists every file with its size and sha256, the config,
  the inputs, software versions and timings. A folder without a manifest is incomplete.
* Long stages commit **shards**: each shard's files, then its own ``_shards/<name>.json``. A rerun
  redoes only the shards whose manifest is missing or whose files no longer match it.
* Readers trust only manifests and verify sha256 when they read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import fsspec

from comat_core.errors import IntegrityError, StorageError
from comat_core.store.paths import check_inside, local_destination, safe_relpath

log = logging.getLogger("comat.storage")

DEFAULT_TIMEOUT = 300.0  # seconds; storage.timeout
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "gcsfs", "google")


def _in_daemon_thread(fn, *args, **kwargs) -> Future:
    """``fn(*args, **kwargs)`` in a daemon thread of its own: a call abandoned at the timeout (a store that
    hangs for good) never keeps the process from exiting, as a pool's worker threads would."""
    future: Future = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(e)

    threading.Thread(target=run, name="comat-storage", daemon=True).start()
    return future


MANIFEST = "_manifest.json"
SHARD_DIR = "_shards"
_KNOWN_PROTOCOLS_HINT = "a local path, s3://bucket/prefix, gs://bucket/prefix or memory://name"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def stage_key(stage: str, config: dict, input_digests: dict[str, str], code_version: str) -> str:
    """A short, stable hash of everything that determines a stage's output."""
    payload = {"stage": stage, "config": config, "inputs": input_digests, "code": code_version}
    return sha256_bytes(canonical_json(payload))[:16]


def content_digest(files: dict[str, dict], records: Iterable[str] = ()) -> str:
    """A stage's output as a downstream key sees it: the sha256 of its ``{file: sha256}`` list.

    ``records`` are glob patterns of files that record how the run went (timings, tracker logs,
    resume checkpoints) rather than its result; they stay out, so they cannot change a key.
    """
    import fnmatch

    records = tuple(records)
    content = {rel: entry["sha256"] for rel, entry in files.items()
               if not any(fnmatch.fnmatch(rel, pattern) for pattern in records)}
    return sha256_bytes(canonical_json(content))


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("comat", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class ArtifactStore:
    """An fsspec filesystem rooted at one URL, with the stage layout and atomic writes."""

    def __init__(self, root: str, storage_options: dict | None = None, timeout: float | None = None):
        # seconds one remote operation may take (storage.timeout); None: DEFAULT_TIMEOUT, 0: unbounded
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.root_url = str(root).rstrip("/")
        options = dict(storage_options or {})
        try:
            fs, path = fsspec.core.url_to_fs(self.root_url, **_default_options(self.root_url, options))
        except (ValueError, ImportError) as e:
            raise StorageError(f"storage URL {root!r} is not usable ({e}); use {_KNOWN_PROTOCOLS_HINT}") from None
        self.fs = fs
        self.root = path.rstrip("/")
        self.is_local = _is_local(fs)
        if self.is_local:
            self.root = os.path.abspath(self.root)
            self.root_url = self.root

    # ---------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        """``root/part/...``; every part is checked (``safe_relpath``): none may lead outside the root."""
        return "/".join([self.root, *[safe_relpath(p.strip("/"), f"store {self.root_url}") for p in parts if p]])

    def stage_file(self, stage: str, key: str, rel: str) -> str:
        """The path of ``rel`` in a stage's folder: a checked name, and on local disk no link leading out."""
        path = self.path(stage, key, rel)
        return check_inside(self.path(stage, key), path, f"stage folder {self.url(stage, key)}") if self.is_local else path

    def url(self, *parts: str) -> str:
        return self.url_of(self.path(*parts))

    def stage_url(self, stage: str, key: str) -> str:
        return self.url(stage, key)

    # ---------------------------------------------------------------- checks
    def check_reachable(self, write: bool = True) -> None:
        """Fail early, with one line, if the root cannot be listed or created.

        ``write=False`` (``comat status``): only read; a local root that does not exist yet is fine
        (it holds nothing), and nothing is created, so status works on a full or read-only disk."""
        try:
            if self.is_local and not write:
                if os.path.exists(self.root) and not os.path.isdir(self.root):
                    raise NotADirectoryError(f"{self.root} is a file")
                if os.path.isdir(self.root):
                    os.listdir(self.root)
            elif self.is_local:
                os.makedirs(self.root, exist_ok=True)
                probe = self.path(f".probe-{uuid.uuid4().hex}")
                with open(probe, "wb") as f:
                    f.write(b"ok")
                os.remove(probe)
            else:
                bucket = self.root.split("/")[0]
                self._remote("list", bucket, self.fs.ls, bucket, detail=False)
        except Exception as e:  # noqa: BLE001 - any backend error means unreachable
            raise StorageError(f"storage {self.root_url!r} is not reachable: {_one_line(e)}") from None

    # ---------------------------------------------------------------- raw IO
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically."""
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self._remote("write", path, self.fs.pipe_file, path, data)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {_one_line(e)}") from None

    def upload_file(self, local_path: str, path: str) -> None:
        """Copy a local file to ``path`` atomically (temp name + rename locally, one upload remotely)."""
        try:
            if self.is_local:
                import shutil

                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, path)
            else:
                self._remote("upload", path, self.fs.put_file, local_path, path)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {_one_line(e)}") from None

    def read_bytes(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(path) if self.is_local else self._remote("read", path, self.fs.cat_file, path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"cannot read {path}: {_one_line(e)}") from None

    def exists(self, path: str) -> bool:
        try:
            return self.fs.exists(path) if self.is_local else self._remote("check", path, self.fs.exists, path)
        except OSError as e:
            raise StorageError(f"cannot reach {path}: {_one_line(e)}") from None

    def remove_file(self, path: str) -> None:
        """Delete one file (bounded by ``storage.timeout`` on remote stores); a missing one is fine."""
        try:
            if self.is_local:
                os.remove(path)
            else:
                self._remote("delete", path, self.fs.rm, path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self.url_of(path)}: {_one_line(e)}") from None
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])

    def remove_tree(self, path: str) -> None:
        if self.exists(path):
            if self.is_local:
                self.fs.rm(path, recursive=True)
            else:
                self._remote("delete", path, self.fs.rm, path, recursive=True)
        self.fs.invalidate_cache()

    def _remote(self, what: str, path: str, fn, *args, **kwargs):
        """Run one remote operation, bounded by ``self.timeout``, with the backend's errors made ours.

        A slow operation is logged while it waits (every quarter of the timeout) and fails with a
        ``StorageError`` at the timeout; connection errors of the object-store clients (botocore,
        aiohttp, ...) become ``StorageError`` too. Both are transient: the stage task retries them.
        The worker thread of an abandoned call is left to finish or fail on its own (it cannot be
        killed); writes are whole-object PUTs, so a late one still writes a complete file."""
        return bounded_call(what, self.url_of(path), self.timeout, fn, *args, **kwargs)

    @property
    def renames_cheaply(self) -> bool:
        """A folder rename is one metadata operation here (local disk, memory), not a copy of every file."""
        return self.is_local or protocol(self.fs) == "memory"

    def set_aside(self, path: str) -> str | None:
        """Rename the folder ``path`` to a hidden sibling and return its new path (None: nothing there).

        Used by ``--force``: the old output stays whole until the new one is committed, and comes back
        if the recompute fails. Only where renames are cheap; elsewhere the caller removes the folder."""
        if not self.exists(path):
            return None
        parent, name = path.rsplit("/", 1)
        aside = f"{parent}/.{name}.replaced-{uuid.uuid4().hex[:8]}"
        if self.is_local:
            os.rename(path, aside)
        else:
            self.fs.mv(path, aside, recursive=True)
        self.fs.invalidate_cache()
        return aside

    def promote(self, staged: str, path: str) -> None:
        """Make the complete folder ``staged`` (manifest included) the folder ``path``, on stores where a
        rename copies every file: the old manifest goes first (from then on the stage reads as incomplete,
        never as the old manifest over new files), then the old files, then the new files are copied
        server-side with the manifest last, and ``staged`` is removed. A crash in between leaves
        ``staged`` complete; the next run finishes the promotion (the stage registry's ``run_stage``).
        Where renames are cheap (a forced fan-out on local disk) the old folder is set aside, ``staged``
        renamed into its place, and the old one removed."""
        if self.renames_cheaply:
            old = self.set_aside(path)
            self.restore(staged, path)  # nothing is at ``path`` now: this is the rename
            if old is not None:
                self.remove_tree(old)
            return
        self.remove_file(f"{path}/{MANIFEST}")
        self.remove_tree(path)
        found = self._remote("list", staged, self.fs.find, staged)
        rels = sorted((f.rstrip("/")[len(staged.rstrip("/")) + 1:] for f in found), key=lambda r: (r == MANIFEST, r))
        for rel in rels:
            self._remote("copy", f"{staged}/{rel}", self.fs.copy, f"{staged}/{rel}", f"{path}/{rel}")
        self.fs.invalidate_cache()
        self.remove_tree(staged)

    def restore(self, aside: str, path: str) -> None:
        """Undo ``set_aside``: drop whatever is at ``path`` now and move ``aside`` back."""
        self.remove_tree(path)
        if self.is_local:
            os.rename(aside, path)
        else:
            self.fs.mv(aside, path, recursive=True)
        self.fs.invalidate_cache()

    def listdir(self, path: str) -> list[str]:
        try:
            self.fs.invalidate_cache(path)
            names = self.fs.ls(path, detail=False) if self.is_local else self._remote(
                "list", path, self.fs.ls, path, detail=False)
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in names)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"cannot list {self.url_of(path)}: {_one_line(e)}") from None

    # ---------------------------------------------------------------- manifests
    def manifest_path(self, stage: str, key: str) -> str:
        return self.stage_file(stage, key, MANIFEST)

    def read_manifest(self, stage: str, key: str) -> dict | None:
        """The stage's manifest, or None when the stage is incomplete or absent (or its manifest unreadable)."""
        self.fs.invalidate_cache(self.path(stage, key))
        data = self.read_json_manifest(self.manifest_path(stage, key), "stage")
        return None if data is None else data[1]

    def content_digest(self, stage: str, key: str, records: Iterable[str] = ()) -> str | None:
        """The complete stage's ``content_digest`` (None when it has no manifest)."""
        manifest = self.read_manifest(stage, key)
        return None if manifest is None else content_digest(manifest.get("files", {}), records)

    def read_json_manifest(self, path: str, what: str) -> tuple[bytes, dict] | None:
        """``(bytes, parsed)`` of a stage or shard manifest; None when it is absent or cannot be read.

        A manifest that is not a JSON object (a torn write by another tool, a disk error, a hand edit),
        or whose ``files`` is not a table, makes its stage or shard incomplete: logged with the file's name, then
        recomputed, never a crash and never counted as done."""
        try:
            raw = self.read_bytes(path)
        except FileNotFoundError:
            return None
        try:
            parsed = json.loads(raw)
            if not isinstance(parsed, dict) or not isinstance(parsed.get("files", {}), dict):
                raise ValueError("not a JSON object with a files table")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("%s manifest %s cannot be read (%s); treating it as incomplete, it will be recomputed",
                        what, self.url_of(path), _one_line(e))
            return None
        return raw, self.checked_manifest(parsed, path, what)

    def checked_manifest(self, parsed: dict, path: str, what: str) -> dict:
        """``parsed`` when every file it lists is a safe relative path; else ``UnsafePathError`` naming both.

        Checked here, where every manifest is read, so no reader, writer or export ever joins such a name."""
        for rel in parsed.get("files", {}):
            safe_relpath(rel, f"{what} manifest {self.url_of(path)}")
        return parsed

    def url_of(self, path: str) -> str:
        """The URL of a path under this store (a local path as is)."""
        return path if self.is_local else f"{protocol(self.fs)}://{path}"

    def is_complete(self, stage: str, key: str) -> bool:
        return self.read_manifest(stage, key) is not None

    def writer(self, stage: str, key: str) -> "StageWriter":
        return StageWriter(self, stage, key)

    def reader(self, stage: str, key: str) -> "StageReader":
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            raise StorageError(f"stage {stage} has no complete output at key {key} ({self.stage_url(stage, key)})")
        return StageReader(self, stage, key, manifest)

    def stage_keys(self, stage: str) -> list[str]:
        return [k for k in self.listdir(self.path(stage)) if not k.startswith(".")]


@dataclass
class FileEntry:
    size: int
    sha256: str


class StageWriter:
    """Writes one stage's files, commits shards, and finally the stage manifest."""

    def __init__(self, store: ArtifactStore, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        self.folder = key  # where the files go: the key, or a staging folder beside it (a forced recompute)
        self.files: dict[str, FileEntry] = {}
        self.started = time.time()

    @property
    def url(self) -> str:
        return self.store.stage_url(self.stage, self.key)

    def path(self, rel: str) -> str:
        return self.store.stage_file(self.stage, self.folder, rel)

    # ---------------------------------------------------------------- files
    def put_bytes(self, rel: str, data: bytes) -> FileEntry:
        self.store.write_bytes(self.path(rel), data)
        entry = FileEntry(len(data), sha256_bytes(data))
        self.files[rel] = entry
        return entry

    def put_json(self, rel: str, obj: Any) -> FileEntry:
        return self.put_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def put_table(self, rel: str, table) -> FileEntry:
        """A pyarrow Table (or a list of row dicts) as Parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(list(table))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.put_bytes(rel, buf.getvalue())

    def put_tensors(self, rel: str, tensors: dict, metadata: dict[str, str] | None = None) -> FileEntry:
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        return self.put_bytes(rel, save(tensors, metadata=metadata))

    def put_image(self, rel: str, image) -> FileEntry:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return self.put_bytes(rel, buf.getvalue())

    def put_file(self, rel: str, local_path: str | Path) -> FileEntry:
        """Upload one local file, streamed (weights of several GB never sit in memory whole)."""
        digest, size = hashlib.sha256(), 0
        with open(local_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
                size += len(chunk)
        self.store.upload_file(str(local_path), self.path(rel))
        entry = FileEntry(size, digest.hexdigest())
        self.files[rel] = entry
        return entry

    def put_local_tree(self, rel: str, local_dir: str | Path) -> list[str]:
        """Upload a local folder (e.g. a diffusers ``save_pretrained`` output) file by file."""
        written = []
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                sub = f"{rel}/{p.relative_to(local_dir).as_posix()}"
                self.put_file(sub, p)
                written.append(sub)
        return written

    # ---------------------------------------------------------------- shards
    def shard_manifest_path(self, name: str) -> str:
        return self.path(f"{SHARD_DIR}/{name}.json")

    def shard_done(self, name: str, verify: bool = True) -> bool:
        """True when the shard's manifest exists and (with ``verify``) its files match it.

        A shard whose files were corrupted is reported as not done, so it is regenerated.
        """
        return self.shard_problem(name, verify) is None

    def shard_problem(self, name: str, verify: bool = True) -> str | None:
        """None when the shard is done (its files are then registered with this writer), else why not."""
        data = self.store.read_json_manifest(self.shard_manifest_path(name), "shard")
        if data is None:
            return "no readable shard manifest"
        if "files" not in data[1]:
            return "its shard manifest lists no files"
        entries = {rel: FileEntry(**e) for rel, e in data[1]["files"].items()}
        if verify:
            for rel, entry in entries.items():
                try:
                    content = self.store.read_bytes(self.path(rel))
                except FileNotFoundError:
                    return f"{rel} is missing"
                if len(content) != entry.size or sha256_bytes(content) != entry.sha256:
                    return f"{rel} does not match its manifest (size or sha256)"
        self.files.update(entries)
        return None

    def commit_shard(self, name: str, files: Iterable[str], meta: dict | None = None) -> None:
        """Write the shard's manifest after its files: from now on the shard counts as done."""
        files = list(files)
        missing = [f for f in files if f not in self.files]
        if missing:
            raise StorageError(f"shard {name}: files were not written through this writer: {missing}")
        manifest = {
            "shard": name,
            "files": {f: vars(self.files[f]) for f in files},
            "meta": meta or {},
            "committed_at": time.time(),
        }
        self.store.write_bytes(self.shard_manifest_path(name), json.dumps(manifest, indent=2).encode())

    def shard_meta(self, name: str) -> dict:
        path = self.shard_manifest_path(name)
        return self.store.checked_manifest(json.loads(self.store.read_bytes(path)), path, "shard")

    def committed_shards(self) -> list[str]:
        """Shards whose manifest exists and can be read (an unreadable one is logged and left out)."""
        names = [n[:-5] for n in self.store.listdir(self.path(SHARD_DIR)) if n.endswith(".json")]
        return [n for n in names if self.store.read_json_manifest(self.shard_manifest_path(n), "shard") is not None]

    # ---------------------------------------------------------------- commit
    def commit(self, *, config: dict, inputs: dict[str, dict], summary: dict | None = None,
               code_version: str = "") -> dict:
        """Write ``_manifest.json`` last. Returns the manifest."""
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "code_version": code_version,
            "config": config,
            "inputs": inputs,
            "files": {rel: vars(e) for rel, e in sorted(self.files.items())},
            "summary": summary or {},
            "software": software_versions(),
            "started_at": self.started,
            "finished_at": time.time(),
            "seconds": round(time.time() - self.started, 3),
        }
        self.store.write_bytes(self.path(MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
        return manifest


class StageReader:
    """Reads a completed stage; every read is checked against the manifest."""

    def __init__(self, store: ArtifactStore, stage: str, key: str, manifest: dict):
        self.store, self.stage, self.key, self.manifest = store, stage, key, manifest

    @property
    def url(self) -> str:
        return self.store.stage_url(self.stage, self.key)

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    @property
    def summary(self) -> dict:
        return self.manifest.get("summary", {})

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        return sorted(f for f in self.files if f.startswith(prefix) and f.endswith(suffix))

    def read_bytes(self, rel: str, verify: bool = True) -> bytes:
        if rel not in self.files:
            raise IntegrityError(f"{self.url}: {rel} is not listed in the manifest")
        try:
            data = self.store.read_bytes(self.store.stage_file(self.stage, self.key, rel))
        except FileNotFoundError:
            raise IntegrityError(f"{self.url}: {rel} is listed in the manifest but missing; recompute it with "
                                 f"comat run --force {self.stage}") from None
        entry = self.files[rel]
        if verify and (len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]):
            raise IntegrityError(f"{self.url}: {rel} does not match its manifest (sha256); recompute it with "
                                 f"comat run --force {self.stage}")
        return data

    def verify(self) -> None:
        """Check every file against the manifest (raises IntegrityError)."""
        for rel in self.files:
            self.read_bytes(rel, verify=True)

    def problems(self) -> list[str]:
        """Every file that is missing or does not match the manifest (size or sha256), with why."""
        out = []
        for rel in sorted(self.files):
            try:
                self.read_bytes(rel, verify=True)
            except IntegrityError as e:
                out.append(f"{rel} ({'missing' if 'missing' in str(e) else 'sha256 mismatch'})")
        return out

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_table(self, rel: str):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(rel)))

    def read_tensors(self, rel: str) -> dict:
        from safetensors.torch import load

        return load(self.read_bytes(rel))

    def read_image(self, rel: str):
        from PIL import Image

        img = Image.open(io.BytesIO(self.read_bytes(rel)))
        img.load()
        return img

    def download_tree(self, rel: str, local_dir: str | Path) -> Path:
        """Materialise a sub-folder (verified) on local disk, e.g. for ``from_pretrained``."""
        local_dir = Path(local_dir)
        for f in self.list(prefix=rel.rstrip("/") + "/"):
            dst = Path(local_destination(local_dir, f[len(rel.rstrip("/")) + 1:], f"manifest of {self.url}"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.read_bytes(f))
        return local_dir


# ---------------------------------------------------------------- helpers

def bounded_call(what: str, url: str, timeout: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, given up after ``timeout`` seconds (0: unbounded) with a one-line
    ``StorageError``; see ``ArtifactStore._remote``. Also bounds calls the store does not make itself
    (Prefect's result storage, ``tasks/results.py``)."""
    try:
        if not timeout:
            return fn(*args, **kwargs)
        future = _in_daemon_thread(fn, *args, **kwargs)
        start = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - start)
            try:
                return future.result(timeout=max(0.01, min(left, max(timeout / 4, 1.0))))
            except FutureTimeout:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise StorageError(f"storage {what} of {url} did not finish in {timeout:g} s "
                                       "(storage.timeout); is the endpoint up?") from None
                log.warning("storage: %s of %s still waiting after %.0f s (gives up at %g s, storage.timeout)",
                            what, url, waited, timeout)
    except (OSError, StorageError):
        raise
    except Exception as e:  # noqa: BLE001 - only client/connection errors are translated
        if type(e).__module__.split(".")[0] in _CLIENT_MODULES:
            raise StorageError(f"cannot {what} {url}: {_one_line(e)}") from None
        raise


def protocol(fs) -> str:
    """A filesystem's protocol name (fsspec gives a string or a tuple of aliases)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs) -> bool:
    return protocol(fs) in ("file", "local")


def _default_options(url: str, options: dict) -> dict:
    """S3 endpoint from AWS_ENDPOINT_URL (s3fs reads the credentials from the environment itself)."""
    if url.startswith(("s3://", "s3a://")):
        options = dict(options)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
        options.setdefault("skip_instance_cache", True)
    return options


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
