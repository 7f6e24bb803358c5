"""The ``world`` stage: build a controlled world's models (the shapes world), and hand them to the stages.

With ``world.kind: shapes`` the pipeline starts here: render the world's datasets, train its base
text-to-image model and its captioner from scratch, and measure them (``worlds/shapes/build.py``).
The stage writes ``base/`` (a diffusers ``StableDiffusionPipeline`` folder), ``captioner/`` (a BLIP
captioning folder) and ``world.json`` (vocabulary, splits, seeds, settings, the base model's binding
and validity, the captioner's binding, wall times).

``world.build: smoke`` trains for about a minute (it checks that everything runs). When
``world.use_shipped`` is on and the settings are those of the models shipped in the package
(``worlds/shapes/pretrained/``), the stage copies them instead of training: the demo starts in
minutes, and the world stage is only needed to change the world (with ``use_shipped: false`` it
retrains them from their seed).

Other stages name the models ``world://base`` and ``world://captioner``. The registry makes this
stage an input of every stage that names one (so its content enters their keys) and, before such a
stage runs, :func:`resolve_world_models` downloads the folders once into the local cache and
replaces the names by local paths in the config the stage sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from comat_core.config import WORLD_SCHEME, ComatConfig
from comat_core.errors import ConfigError

log = logging.getLogger("comat.world")

PARTS = ("base", "captioner")
REPORT = "world.json"


def world_settings(cfg: ComatConfig):
    """The world's own build settings: the smoke or full defaults with ``world.settings`` on top (validated)."""
    from pydantic import ValidationError

    from comat_core.worlds.shapes.settings import WorldConfig

    if cfg.world.kind != "shapes":
        raise ConfigError(f"world.kind {cfg.world.kind!r} has no world stage")
    try:
        return WorldConfig.smoke(**cfg.world.settings) if cfg.world.build == "smoke" else WorldConfig(**cfg.world.settings)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"world.settings.{where}: {first['msg']}") from None


def shipped_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "worlds" / "shapes" / "pretrained"


def shipped_matches(settings) -> bool:
    """The package ships models built with exactly these settings."""
    report = shipped_dir() / REPORT
    if not report.is_file() or not all((shipped_dir() / p).is_dir() for p in PARTS):
        return False
    shipped = json.loads(report.read_text(encoding="utf-8")).get("config")
    try:
        return type(settings)(**shipped) == settings
    except (TypeError, ValueError):  # a world built by other code: its settings are not these
        return False


def shipped_digest() -> str:
    """The shipped folder's content as the store digests a stage's output: sha256 of its ``{file: sha256}``."""
    from comat_core.store.storage import canonical_json, sha256_bytes

    root = shipped_dir()
    files = {p.relative_to(root).as_posix(): sha256_bytes(p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    return sha256_bytes(canonical_json(files))


def key_config(cfg: ComatConfig) -> dict:
    """What the world stage adds to its key: every build setting as resolved (so a changed default is a
    new key, not only a changed override) and, when the shipped models are copied, their content (so
    replacing the shipped world never hits an old world's key, nor the local model cache under it)."""
    if cfg.world.kind != "shapes":
        return {}
    settings = world_settings(cfg)
    copied = cfg.world.use_shipped and shipped_matches(settings)
    return {"settings": settings.model_dump(mode="json"), "shipped": shipped_digest() if copied else None}


def run(ctx) -> dict:
    """Stage entry point (see comat_core.stages.registry)."""
    settings = world_settings(ctx.cfg)
    out = ctx.scratch() / "world"
    if ctx.cfg.world.use_shipped and shipped_matches(settings):
        log.info("world: copying the shipped models (settings match; world.use_shipped=false retrains them)")
        shutil.copytree(shipped_dir(), out)
        source = "shipped"
    else:
        from comat_core.worlds.shapes.build import build_world

        def progress(part: str, done: int, total: int, info: dict) -> None:
            detail = " ".join(f"{k}={v}" for k, v in info.items())
            ctx.progress(done, total, f"world {part}: {done}/{total} {detail}".strip())

        log.info("world: building (%s): datasets, base model, captioner", ctx.cfg.world.build)
        build_world(settings, out, progress)
        source = "built"
    for part in PARTS:
        ctx.writer.put_local_tree(part, out / part)
    ctx.writer.put_file(REPORT, out / REPORT)
    report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    return {"source": source, "build": ctx.cfg.world.build, "metrics": report.get("metrics", {}),
            "seconds_by_part": report.get("seconds", {})}


def resolve_world_models(cfg: ComatConfig, reader) -> ComatConfig:
    """``cfg`` with every ``world://<part>`` model replaced by a local copy of the world stage's folder.

    The copy lives in ``<comat cache>/world/<world key>/<part>``, made once (in a temporary folder,
    then renamed, so a crash never leaves half a model there); every file is checked against the
    world stage's manifest as it is downloaded.
    """
    from comat_core.models.loader import cache_dir

    updates = {}
    for field, value in cfg.models.model_dump().items():
        if isinstance(value, str) and value.startswith(WORLD_SCHEME):
            part = value[len(WORLD_SCHEME):]
            if part not in PARTS:
                raise ConfigError(f"models.{field}={value}: the world has {', '.join(WORLD_SCHEME + p for p in PARTS)}")
            updates[field] = str(_local_copy(reader, part, cache_dir() / "world" / reader.key))
    if not updates:
        return cfg
    return cfg.model_copy(update={"models": cfg.models.model_copy(update=updates)})


def _local_copy(reader, part: str, root: Path) -> Path:
    target = root / part
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=root))
    try:
        reader.download_tree(part, tmp / part)
        try:
            os.rename(tmp / part, target)
        except OSError:  # another process made it first: theirs is complete too
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
