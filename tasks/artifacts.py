"""Prefect UI artifacts for a stage run: progress, what was written, where, and what it looks like.

Every artifact has a stable key ``comat-<scope>-<stage>-<kind>`` (lowercase, dashes), where the
scope is the preset and a short hash of the storage root (``pipeline_scope``): the UI's Artifacts
page shows one history per pipeline, stage and kind, and two pipelines on one server (another
preset, another bucket) never interleave their histories. The parent run adds
``comat-<scope>-run-summary`` (``tasks/summary.py``).

* ``progress`` - a progress artifact moved by the stage's ``ctx.progress(done, total, message)``;
* ``outputs``  - a table: stage, key, cached or computed, file count, bytes, seconds, URL;
* ``storage``  - the stage's folder in the artifact store (a link where a browser can open it, else the path);
* ``images``   - the stage's preview images (gan_gt ``preview.png``, masks overlays, train
  ``samples/*.png``, evaluation grids), embedded as base64 PNG when small, else linked;
* ``curves``   - the training curves from ``metrics.parquet`` as a table;
* ``report`` / ``summary`` - a stage's markdown report (``*.md``) and ``summary.json`` as a table.

What gets published is read from the stage's manifest, so stages need no Prefect code and a stage
that writes none of these files simply gets fewer artifacts. A cache hit publishes one small note
(``outputs``: where the output is and when it was computed), not its images again. Publishing never
fails a stage: a problem is logged as a warning (the stage's output in storage is what matters).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from urllib.parse import quote
from uuid import UUID

from tasks.rows import _clean, result_rows  # noqa: F401 - result_rows is used here and re-exported
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from comat_core.stages.registry import StageResult
from comat_core.store.storage import ArtifactStore, StageReader

log = logging.getLogger("comat.artifacts")

IMAGE_PATTERNS = ("preview*.png", "*overlay*.png", "samples/*.png", "chart.png", "*grid*.png", "*side*by*side*.png")
MAX_IMAGES = 8
INLINE_LIMIT = 500_000  # bytes: larger images are linked, not embedded
MAX_CURVE_ROWS = 200
SIGNED_URL_SECONDS = 7 * 24 * 3600


def pipeline_scope(preset: str, storage_root_url: str) -> str:
    """``<preset>-<6 hex of the storage root>``: what tells one pipeline's artifacts from another's."""
    return f"{preset}-{hashlib.sha256(storage_root_url.encode()).hexdigest()[:6]}"


def artifact_key(scope: str, stage: str, kind: str) -> str:
    """``comat-<scope>-<stage>-<kind>`` with underscores as dashes (Prefect keys: lowercase, digits, dashes)."""
    return f"comat-{scope}-{stage}-{kind}".replace("_", "-").replace(".", "-").lower()


def _safely(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - an artifact must never fail the stage it describes
        log.warning("could not publish the %s artifact: %s: %s", what, type(e).__name__, e)
        return None


class ProgressReporter:
    """A progress artifact for one stage run; ``update`` is the stage's ``ctx.progress`` callback.

    Updates are throttled (one API call per ``every`` seconds, plus the final one) so a stage may
    report every step without slowing down. The artifact is created by ``start`` (a stage about to
    compute), never for a cache hit.
    """

    def __init__(self, stage: str, key: str, scope: str, every: float = 1.0):
        self.stage, self.key, self.scope, self.every = stage, key, scope, every
        self.last = 0.0
        self.percent = 0.0
        self.id: UUID | None = None

    def start(self) -> None:
        if self.id is None:
            self.id = _safely("progress", create_progress_artifact, 0.0,
                              key=artifact_key(self.scope, self.stage, "progress"),
                              description=f"{self.stage} `{self.key}`: starting")

    def update(self, done: int, total: int, message: str = "") -> None:
        percent = 100.0 * done / total if total else 100.0
        self.percent = max(0.0, min(100.0, percent))
        now = time.monotonic()
        if self.id is None or (now - self.last < self.every and done < total):
            return
        self.last = now
        text = f"{self.stage} `{self.key}`: {done}/{total} {message}".strip()
        _safely("progress", update_progress_artifact, self.id, self.percent, description=text)

    def fail(self, error: BaseException) -> None:
        """Say how the stage ended: failed (an exception), or interrupted (cancelled, killed, crashed)."""
        if self.id is None:
            return
        if isinstance(error, Exception):
            text = f"{self.stage} `{self.key}`: failed at {self.percent:.0f}%: {type(error).__name__}: {error}"
        else:  # TerminationSignal (cancel, SIGTERM), KeyboardInterrupt, SystemExit
            text = (f"{self.stage} `{self.key}`: interrupted at {self.percent:.0f}% (cancelled or crashed: "
                    f"{type(error).__name__}); committed shards and checkpoints are kept, a rerun resumes")
        _safely("progress", update_progress_artifact, self.id, self.percent, description=text[:1000])

    def finish(self, cached: bool) -> None:
        if self.id is not None:
            text = f"{self.stage} `{self.key}`: " + ("cached (manifest exists)" if cached else "complete")
            _safely("progress", update_progress_artifact, self.id, 100.0, description=text)


def publish_stage(store: ArtifactStore, result: StageResult, seconds: float, scope: str) -> None:
    """Every artifact the stage's manifest allows (see the module docstring); one note for a cache hit."""
    if result.cached:
        _safely("outputs", publish_cached_note, store, result, scope)
        return
    reader = StageReader(store, result.stage, result.key, result.manifest)
    _safely("outputs", publish_outputs, reader, result, seconds, scope)
    _safely("storage", publish_link, store, result, scope)
    _safely("images", publish_images, store, reader, scope)
    _safely("curves", publish_curves, store, reader, scope)
    _safely("report", publish_report, reader, scope)
    _safely("summary", publish_summary, reader, scope)


def publish_cached_note(store: ArtifactStore, result: StageResult, scope: str) -> None:
    m = result.manifest
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(m.get("finished_at", 0))))
    create_markdown_artifact(
        f"**{result.stage}** `{result.key}`: cached, nothing recomputed. Computed {when} in "
        f"{float(m.get('seconds', 0)):.1f} s; {len(m.get('files', {}))} files in "
        f"{folder_markdown(store, result.url)}.",
        key=artifact_key(scope, result.stage, "outputs"), description=f"{result.stage}: cache hit")


def outputs_row(result: StageResult, seconds: float) -> dict:
    files = result.manifest.get("files", {})
    return {
        "stage": result.stage,
        "key": result.key,
        "cached": result.cached,
        "files": len(files),
        "bytes": sum(int(f.get("size", 0)) for f in files.values()),
        "seconds": round(float(result.manifest.get("seconds", seconds)), 3),
        "url": result.url,
    }


def publish_outputs(reader: StageReader, result: StageResult, seconds: float, scope: str) -> None:
    row = outputs_row(result, seconds)
    state = "cached: nothing recomputed" if result.cached else f"computed in {seconds:.1f} s"
    scalars = {k: v for k, v in reader.summary.items() if isinstance(v, (int, float, str, bool))}
    create_table_artifact([row], key=artifact_key(scope, result.stage, "outputs"),
                          description=f"**{result.stage}** `{result.key}` ({state})\n\n"
                                      f"summary: `{json.dumps(scalars, default=str)[:1500]}`")


def folder_link(store: ArtifactStore, url: str) -> str | None:
    """A web address that opens a stage folder, or None when there is none: a browser blocks
    ``file://`` links from a web page, and a bare ``s3://`` URL opens nothing. An S3 folder on AWS
    gets its S3 console address; a local path, another endpoint (MinIO, moto) or protocol has none."""
    if store.is_local or not url.startswith("s3://"):
        return None
    fs = store.fs
    endpoint = (getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "")
    if endpoint and "amazonaws.com" not in endpoint:
        return None
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={quote(prefix.rstrip('/') + '/')}"


def folder_markdown(store: ArtifactStore, url: str) -> str:
    """A stage folder in markdown: a link where one opens (``folder_link``), else the path as text."""
    link = folder_link(store, url)
    return f"[{url}]({link})" if link else f"`{url}`"


def publish_link(store: ArtifactStore, result: StageResult, scope: str) -> None:
    key = artifact_key(scope, result.stage, "storage")
    description = f"storage folder of {result.stage} `{result.key}` (manifest: `_manifest.json`)"
    link = folder_link(store, result.url)
    if link:
        create_link_artifact(link, link_text=result.url, key=key, description=description)
    else:
        create_markdown_artifact(f"{result.stage} `{result.key}`: {folder_markdown(store, result.url)}",
                                 key=key, description=description)


def preview_images(files: list[str]) -> list[str]:
    """The manifest's preview images, at most MAX_IMAGES: patterns in order, the last (latest) files of each."""
    chosen: list[str] = []
    for pattern in IMAGE_PATTERNS:
        budget = MAX_IMAGES - len(chosen)
        if budget <= 0:
            break
        matches = sorted(f for f in files if fnmatch.fnmatch(f, pattern) and f not in chosen)
        chosen.extend(matches[-budget:])
    return chosen


def _image_markdown(store: ArtifactStore, reader: StageReader, rel: str) -> str:
    size = int(reader.files[rel]["size"])
    if size <= INLINE_LIMIT:
        data = base64.b64encode(reader.read_bytes(rel)).decode()
        return f"**{rel}**\n\n![{rel}](data:image/png;base64,{data})\n"
    url = _image_url(store, reader, rel)
    where = f"[{rel}]({url})" if url else f"`{store.path(reader.stage, reader.key, rel)}`"
    return f"**{rel}** ({size / 1e6:.1f} MB): {where}\n"


def _image_url(store: ArtifactStore, reader: StageReader, rel: str) -> str | None:
    path = store.path(reader.stage, reader.key, rel)
    if store.is_local:
        return None  # a browser opens no file:// link from a web page: the path is shown as text
    from urllib.parse import unquote

    from comat_core.store.credentials import redact

    try:
        signed = store.fs.sign(path, expiration=SIGNED_URL_SECONDS)
    except (NotImplementedError, AttributeError, ValueError):
        signed = None
    if signed is None or redact(unquote(signed)) != unquote(signed):  # signed with a session token: it carries it
        return store.url(reader.stage, reader.key, rel)
    return signed


def evaluation_pictures(store: ArtifactStore, stage_urls: dict[str, str]) -> list[str]:
    """The evaluation's chart (base vs tuned per category, with intervals) and grid, for the run summary:
    embedded when small, else linked; [] when the run has no complete evaluation."""
    url = stage_urls.get("evaluate")
    key = url.rstrip("/").rsplit("/", 1)[-1] if url else None
    manifest = store.read_manifest("evaluate", key) if key else None
    if manifest is None:
        return []
    reader = StageReader(store, "evaluate", key, manifest)
    return [_image_markdown(store, reader, rel) for rel in ("chart.png", "grid.png") if rel in reader.files]


def publish_images(store: ArtifactStore, reader: StageReader, scope: str) -> None:
    images = preview_images(list(reader.files))
    if not images:
        return
    parts = [f"### {reader.stage} `{reader.key}`\n"] + [_image_markdown(store, reader, rel) for rel in images]
    create_markdown_artifact("\n".join(parts), key=artifact_key(scope, reader.stage, "images"),
                             description=f"{len(images)} preview image(s) of {reader.stage}")
    large = [rel for rel in images if int(reader.files[rel]["size"]) > INLINE_LIMIT]
    if large and not store.is_local:
        create_image_artifact(_image_url(store, reader, large[-1]), key=artifact_key(scope, reader.stage, "image"),
                              description=large[-1])


def curve_rows(table) -> list[dict]:
    """Rows of a metrics table (one per logged step), thinned to at most MAX_CURVE_ROWS, last row kept."""
    rows = table.to_pylist()
    if len(rows) > MAX_CURVE_ROWS:
        stride = math.ceil(len(rows) / (MAX_CURVE_ROWS - 1))  # leaves room for the last row
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return [{k: _clean(v) for k, v in row.items()} for row in rows]


def publish_curves(store: ArtifactStore, reader: StageReader, scope: str) -> None:
    """The curves chart (``curves.png``, written by the stage) embedded in markdown, and the table beside it."""
    for rel in reader.list(suffix="metrics.parquet"):
        rows = curve_rows(reader.read_table(rel))
        if not rows:
            continue
        chart = rel.replace("metrics.parquet", "curves.png")
        if chart in reader.files:
            create_markdown_artifact(f"### {reader.stage} `{reader.key}`: training curves\n\n"
                                     + _image_markdown(store, reader, chart),
                                     key=artifact_key(scope, reader.stage, "curves-chart"),
                                     description=f"{chart}: each loss term, grad norms, discriminator logits, step time")
        create_table_artifact(rows, key=artifact_key(scope, reader.stage, "curves"),
                              description=f"training curves from {rel} ({len(rows)} rows)")
        return


def publish_report(reader: StageReader, scope: str) -> None:
    reports = [f for f in reader.list(suffix=".md") if "/" not in f]
    if reports:
        text = "\n\n".join(reader.read_bytes(f).decode("utf-8", "replace") for f in reports)
        create_markdown_artifact(text, key=artifact_key(scope, reader.stage, "report"),
                                 description=f"{reader.stage} report ({', '.join(reports)})")


def summary_rows(summary) -> list[dict]:
    """``summary.json`` as table rows: evaluation ``results`` per category and metric; else a list of
    records as is, a dict of records with a ``name`` column, anything else as (key, value) rows."""
    if isinstance(summary, dict) and isinstance(summary.get("results"), dict):
        rows = result_rows(summary["results"])
        if rows:
            return rows
    if isinstance(summary, list) and all(isinstance(r, dict) for r in summary):
        return [{k: _clean(v) for k, v in r.items()} for r in summary]
    if isinstance(summary, dict) and summary and all(isinstance(v, dict) for v in summary.values()):
        return [{"name": k, **{kk: _clean(vv) for kk, vv in v.items()}} for k, v in summary.items()]
    flat: list[dict] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat.append({"key": prefix, "value": _clean(value)})

    walk("", summary)
    return flat


def publish_summary(reader: StageReader, scope: str) -> None:
    if "summary.json" in reader.files:
        rows = summary_rows(reader.read_json("summary.json"))
        if rows:
            create_table_artifact(rows, key=artifact_key(scope, reader.stage, "summary"),
                                  description=f"{reader.stage} summary.json")
