"""The stage registry and the one function that runs a stage against the artifact store.

Order: [world, a controlled world only] → prompts → [sdxl_prefinetune, SDXL only] → gan_gt → masks → train
→ evaluate. The world stage is an input of every stage whose models name ``world://`` (see ``world.py``).

Each stage is a plain function ``run(ctx: StageContext) -> dict`` (its summary) in its own module.
``run_stage`` computes the stage key from (stage, config section, input content digests, code
version), returns the existing output when its manifest is there (a cache hit), and otherwise calls
the stage function and commits the manifest last. Prefect tasks (``tasks/``) and the CLI both go
through here, so caching means the same thing everywhere.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from comat_core.config import ComatConfig
from comat_core.errors import ComatError, ConfigError, StorageError
from comat_core.progress import StageProgress
from comat_core.store.lease import describe, holders, stage_lease
from comat_core.store.shards import ShardPart
from comat_core.store.storage import MANIFEST, ArtifactStore, StageReader, StageWriter, stage_key

log = logging.getLogger("comat")

ProgressFn = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, message: str = "") -> None:
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    code_version: str
    runner: str  # "module:function", imported lazily (stage modules import torch)
    models: tuple[str, ...] = ()  # fields of cfg.models that change this stage's output
    runtime: tuple[str, ...] = ()  # fields of cfg.runtime that change this stage's output
    gpu: bool = False
    sharded: bool = False  # commits shards and accepts a ShardPart (fan-out over workers, comat_core/store/shards.py)
    # files that record how the run went or show it (timings, tracker logs, resume checkpoints, previews),
    # not its result: they stay out of the dependants' keys (``content_digest``), so neither a rerun with
    # the same result nor a change to how a preview is drawn invalidates the stages after it
    records: tuple[str, ...] = ()

    def run_fn(self) -> Callable[["StageContext"], dict]:
        module, fn = self.runner.split(":")
        return getattr(importlib.import_module(module), fn)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        # code version: the world's own WORLD_VERSION (a test checks), so a new world never hits an old world's
        # key, nor the local model cache under it
        Stage("world", (), "3", "comat_core.stages.world:run", records=("world.json",)),  # its build timings
        # prompts 2: each entity also stores its token positions for models.pretrained's tokenizer
        Stage("prompts", (), "2", "comat_core.stages.prompts:run", models=("family", "pretrained")),
        Stage("sdxl_prefinetune", ("prompts",), "1", "comat_core.stages.prefinetune:run",
              models=("family", "pretrained", "vae"), runtime=("mixed_precision", "seed"), gpu=True, sharded=True),
        # gan_gt 3: drawn by the trainer's sampler in the training precision (was a diffusers pipeline)
        Stage("gan_gt", ("prompts", "sdxl_prefinetune"), "3", "comat_core.stages.gan_gt:run",
              models=("family", "pretrained", "vae"), runtime=("mixed_precision",), gpu=True, sharded=True,
              records=("preview.png",)),
        Stage("masks", ("prompts", "gan_gt"), "2", "comat_core.stages.masks.stage:run",
              models=("family", "pretrained", "vae", "grounding_dino", "sam", "sam_checkpoint", "sam_model_type"),
              runtime=("mixed_precision",), gpu=True, sharded=True, records=("overlay.png",)),
        # train 3: the one decoder (fp32 for a force_upcast VAE in fp16, latents_mean/std honoured) and the
        # Mixed Latent noise drawn whenever it is on; the same bytes in fp32 and bf16 with p_mixed 0
        Stage("train", ("prompts", "gan_gt", "masks", "sdxl_prefinetune"), "3", "comat_core.stages.train.stage:run",
              models=("family", "pretrained", "vae", "captioner", "discriminator"),
              runtime=("mixed_precision", "seed"), gpu=True,
              records=("metrics.parquet", "curves.png", "samples/*", "logs/*", "checkpoints/*")),
        Stage("evaluate", ("train", "sdxl_prefinetune"), "1", "comat_core.stages.evaluate.stage:run",
              models=("family", "pretrained", "vae", "vqa", "clip", "grounding_dino", "captioner"),
              runtime=("mixed_precision",), gpu=True, sharded=True),
    ]
}


# What train loads in place of the masks stage when it segments its own images (``train.masks: online``).
SEGMENTER_MODELS = ("grounding_dino", "sam", "sam_checkpoint", "sam_model_type")


def stage_models(cfg: ComatConfig, stage: str) -> tuple[str, ...]:
    """The ``models.*`` fields a stage loads under this config: its own, plus the segmenter's for a train
    stage that segments its online images (``train.masks: online``) and the verdict classifier for one
    whose concept term it scores (``train.losses.concept_reward: shapes_verdict``)."""
    models = STAGES[stage].models
    if stage == "train" and not cfg.train.offline_masks:
        models += SEGMENTER_MODELS
    if stage == "train" and cfg.train.losses.concept_reward == "shapes_verdict":
        models += ("verdict",)  # the classifier's weights are the reward: their content enters the key
    return models


def stage_inputs(cfg: ComatConfig, stage: str) -> list[str]:
    """The inputs a stage reads under this config (sdxl_prefinetune only when it is enabled; masks only when
    ``train.masks`` is offline, see ``ComatConfig.stage_order``; the world stage for every stage whose
    models name ``world://``)."""
    active = set(cfg.stage_order())
    inputs = [s for s in STAGES[stage].inputs if s in active]
    if stage != "world" and "world" in active and _reads_world(cfg, stage):
        inputs.insert(0, "world")
    return inputs


def _reads_world(cfg: ComatConfig, stage: str) -> bool:
    from comat_core.config import WORLD_SCHEME

    values = [getattr(cfg.models, f) for f in stage_models(cfg, stage)]
    return any(isinstance(v, str) and v.startswith(WORLD_SCHEME) for v in values)


def downstream(cfg: ComatConfig, stages: set[str]) -> set[str]:
    """The given stages and everything that (transitively) reads them."""
    out = set(stages)
    for s in cfg.stage_order():
        if any(i in out for i in stage_inputs(cfg, s)):
            out.add(s)
    return out


def stage_config(cfg: ComatConfig, stage: str) -> dict:
    """What goes into a stage's key: its own section, the models it uses and its runtime fields."""
    from comat_core.models.loader import model_fingerprint

    spec = STAGES[stage]
    section = getattr(cfg, stage)
    # a section may leave out what does not change its output (train: how processes are laid out)
    section = section.key_dump() if hasattr(section, "key_dump") else section.model_dump(mode="json")
    models = {name: _fingerprint(name, getattr(cfg.models, name), model_fingerprint)
              for name in stage_models(cfg, stage)}
    runtime = {name: getattr(cfg.runtime, name) for name in spec.runtime}
    out = {"section": section, "models": models, "runtime": runtime}
    if stage == "train" and not cfg.train.offline_masks:  # the segmenter's settings, in place of the masks stage
        out["segmenter"] = cfg.masks.model_dump(mode="json")
    if stage == "world":
        from comat_core.stages.world import key_config

        out["world"] = key_config(cfg)
    if stage == "prompts":
        from comat_core.stages.prompts import sources_fingerprint

        from comat_core.stages.entities import resolve_parser

        out["sources"] = sources_fingerprint(cfg.prompts, cfg.storage.options)
        out["parser"] = resolve_parser(cfg.prompts.parser)  # "auto" differs between machines
    if stage == "evaluate":
        from comat_core.stages.prompts import PromptsConfig, sources_fingerprint

        files = PromptsConfig(sources=[f"{cfg.evaluate.prompt_dir.rstrip('/')}/*.txt"])
        out["prompt_files"] = sources_fingerprint(files, cfg.storage.options)["sources"]
    return out


def _fingerprint(field: str, value, model_fingerprint) -> Any:
    """Model names enter keys as fingerprints; plain settings and checkpoint files as they are."""
    if not isinstance(value, str) or field in ("family", "sam_model_type"):
        return value
    if field == "sam_checkpoint":
        import os

        return f"{value}#{os.path.getsize(value) if os.path.isfile(value) else 'missing'}"
    return model_fingerprint(value)


@dataclass
class StageResult:
    stage: str
    key: str
    url: str
    cached: bool
    manifest: dict
    partial: bool = False  # a fan-out part: its shards are in storage, the stage is not committed


@dataclass
class StageContext:
    """Everything a stage function needs; the stage writes through ``writer`` and reads ``inputs``."""

    cfg: ComatConfig
    store: ArtifactStore
    stage: str
    key: str
    writer: StageWriter
    inputs: dict[str, StageReader]
    progress: ProgressFn = _no_progress
    hooks: dict[str, Any] = field(default_factory=dict)  # test hooks, e.g. {"fail_at_shard": 2}
    shard_part: ShardPart | None = None  # compute only this part of the shards and skip the rest (fan-out)
    workdir: Path | None = None  # local scratch, removed after the stage

    @property
    def section(self):
        return getattr(self.cfg, self.stage)

    def scratch(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=scratch_prefix(self.stage)))
        return self.workdir


def scratch_prefix(stage: str) -> str:
    """``comat-<stage>-<pid>-``: a scratch folder in the temp directory names the process that uses it, so
    one left by a killed run is recognised and removed by the next (``remove_leftovers``)."""
    return f"comat-{stage}-{os.getpid()}-"


_SCRATCH = re.compile(r"^comat-[a-z_-]+?-(\d+)-[a-z0-9_]{8}$")  # scratch_prefix + mkdtemp's 8 characters


def remove_leftovers(store: ArtifactStore, stage: str, key: str) -> None:
    """Remove what killed runs left behind: scratch folders of processes that are gone (temp directory) and,
    under this key's lease (no live writer), the stage folder's unfinished ``*.tmp-*`` files (local disk)."""
    from comat_core.store.lease import pid_alive

    tmp = Path(tempfile.gettempdir())
    for folder in tmp.glob("comat-*"):
        match = _SCRATCH.match(folder.name)
        if match and folder.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a process that is gone", folder)
    if store.is_local and os.path.isdir(store.path(stage, key)):
        left = [p for p in Path(store.path(stage, key)).rglob("*.tmp-*") if p.is_file()]
        for p in left:
            p.unlink(missing_ok=True)
        if left:
            log.info("%s: removed %d unfinished file(s) (*.tmp-*) left by an interrupted run", stage, len(left))


def name_or(stage: str) -> str:
    if stage not in STAGES:
        raise ComatError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return stage


def input_digest(store: ArtifactStore, stage: str, key: str) -> str | None:
    """What a dependant's key sees of a complete stage: its files' sha256 list, records left out.

    Not the manifest's bytes: those hold timings and software versions, which would give two stores
    that ran the same config different keys, and make a rerun with identical output invalidate its
    dependants. A different torch that computes different bytes changes the key through the bytes.
    """
    return store.content_digest(stage, key, STAGES[stage].records)


def compute_key(cfg: ComatConfig, store: ArtifactStore, stage: str) -> str:
    """The stage key; its inputs must be complete (their content digests enter the key)."""
    digests = {}
    for name in stage_inputs(cfg, name_or(stage)):
        key = compute_key(cfg, store, name)
        digest = input_digest(store, name, key)
        if digest is None:
            raise StorageError(f"stage {stage} needs {name}, which is not complete at key {key}; run it first")
        digests[name] = f"{key}:{digest}"
    spec = STAGES[stage]
    return stage_key(stage, stage_config(cfg, stage), digests, spec.code_version)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _setting_name(stage: str, path: str) -> str:
    """A key-config path (``section.x``, ``models.pretrained``) as the setting a user writes."""
    if path == "section.gradient_accumulation_steps" and stage == "train":
        return "train micro-batches per step (gradient_accumulation_steps x num_processes)"
    return f"{stage}.{path[len('section.'):]}" if path.startswith("section.") else path


def other_outputs(cfg: ComatConfig, store: ArtifactStore, stage: str) -> list[tuple[str, list[str]]]:
    """Complete outputs of ``stage`` in the store under other keys, nearest first: (url, what differs).

    What differs is read from the config each manifest records (the stage's key config) against this
    config's, as ``setting: theirs there, ours here``; outputs whose settings are all the same differ
    in their inputs."""
    try:
        ours = _flatten(stage_config(cfg, stage))
    except Exception:  # noqa: BLE001 - a hint must never replace the error it explains
        return []
    found = []
    for key in store.listdir(store.path(stage)):
        manifest = store.read_manifest(stage, key) if not key.startswith(".") else None
        if not manifest or not isinstance(manifest.get("config"), dict):
            continue
        theirs = _flatten(manifest["config"])
        diffs = [f"{_setting_name(stage, k)}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
                 for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        found.append((len(diffs) or 99, -float(manifest.get("finished_at", 0)), store.stage_url(stage, key),
                      diffs or [f"its inputs ({', '.join(sorted(manifest.get('inputs') or {})) or 'none'})"]))
    return [(url, diffs) for _, _, url, diffs in sorted(found)]


def missing_input_advice(cfg: ComatConfig, store: ArtifactStore, name: str, run_it: str) -> str:
    """What to do about an input ``name`` with no complete output at this config's key.

    When the store holds a complete ``name`` under another key (a setting given to one command
    only, such as the process layout on the train command), say where and what differs, and do not
    advise a command: running ``name`` again would compute it anew (for train: hours of GPUs).
    Otherwise ``run_it``, the command that computes it."""
    others = other_outputs(cfg, store, name)
    if not others:
        return run_it
    url, diffs = others[0]
    more = f" (and {len(others) - 1} other complete output(s))" if len(others) > 1 else ""
    return (f"a complete {name} output with other settings is at {url}{more}, differing in "
            f"{'; '.join(diffs[:3])}{'; …' if len(diffs) > 3 else ''}: if it is the one you mean, give this "
            f"command the settings that run had (put them in the --config file every command of the run reads) "
            f"rather than computing {name} again")


def run_stage(cfg: ComatConfig, store: ArtifactStore, stage: str, *, force: bool = False,
              progress: ProgressFn | None = None, hooks: dict | None = None,
              shard_part: ShardPart | None = None, staged: str | None = None) -> StageResult:
    """Run one stage unless its output is already complete. ``force`` recomputes it: inputs are
    verified first and the old output is kept aside until the new one is committed (``_force_aside``).

    ``shard_part`` (sharded stages, fan-out): compute only that part's shards and return a
    ``partial`` result without committing the manifest; a later call without it commits.

    ``staged`` (a forced fan-out, ``staging_folder``): the parts and the final call write into this
    folder beside the old output, which stays complete and readable; the final call commits there and
    promotes it over the old output. A failed or killed fan-out leaves the old output as it was.
    """
    spec = STAGES[name_or(stage)]
    if shard_part is not None:
        if not spec.sharded:
            raise ConfigError(f"stage {stage} is not sharded; run it without a shard part")
        if force:
            raise ConfigError(f"{stage}: force with a shard part would delete the other parts' shards; "
                              "force the whole stage once, before the fan-out")
    if staged is not None and not re.fullmatch(r"\.[0-9a-f]+\.staged-[0-9a-f]{8}", staged):
        raise ConfigError(f"{stage}: staging folder {staged!r} is not one staging_folder names")
    key = compute_key(cfg, store, stage)
    if staged is not None and not staged.startswith(f".{key}."):
        raise ConfigError(f"{stage}: staging folder {staged} belongs to another key than {key}")
    fresh = force or staged is not None  # an existing output is replaced, not a cache hit
    if not fresh:
        manifest = store.read_manifest(stage, key)
        if manifest is not None:
            log.info("%s: cache hit %s", stage, store.stage_url(stage, key))
            return StageResult(stage, key, store.stage_url(stage, key), True, manifest)
    part = f"{shard_part.index + 1}-{shard_part.count}" if shard_part is not None else ""
    done = (lambda: False) if fresh else (lambda: store.read_manifest(stage, key) is not None)
    # one writer per key (comat_core/store/lease.py): a second run waits here, then finds the manifest
    with stage_lease(store, stage, key, part, done=done) as compute:
        if not compute:
            log.info("%s: cache hit %s (computed by another run meanwhile)", stage, store.stage_url(stage, key))
            return StageResult(stage, key, store.stage_url(stage, key), True, store.read_manifest(stage, key))
        if not fresh and shard_part is None and _finish_promotion(store, stage, key):
            return StageResult(stage, key, store.stage_url(stage, key), True, store.read_manifest(stage, key))
        if staged is not None:  # a forced fan-out: its parent verified the inputs; the folder is shared
            return _compute(cfg, store, spec, stage, key, progress, hooks, shard_part, staged=staged, shared=True)
        aside = _force_aside(cfg, store, stage, key) if force else None
        staged = staging_folder(key) if force and not store.renames_cheaply else None
        return _compute(cfg, store, spec, stage, key, progress, hooks, shard_part, aside, staged)


def staging_folder(key: str) -> str:
    """A fresh staging folder name for a forced recompute of ``key``: ``.<key>.staged-<8 hex>``, beside the
    old output in the stage's folder (ignored by readers; removed or promoted by the run that made it)."""
    return f".{key}.staged-{uuid.uuid4().hex[:8]}"


def _compute(cfg: ComatConfig, store: ArtifactStore, spec: Stage, stage: str, key: str, progress, hooks,
             shard_part: ShardPart | None, aside: str | None = None, staged: str | None = None,
             shared: bool = False) -> StageResult:
    """Run the stage function under its lease, then commit its manifest (unless it is a fan-out part).

    ``aside``: the old output of a forced stage, put back if this fails, removed once the new one is committed.
    ``staged``: a forced stage on an object store writes into this folder beside the old output, which
    stays in place and readable until the new one is complete (``ArtifactStore.promote``).
    ``shared``: ``staged`` belongs to a forced fan-out (its parts' shards): kept when this call fails."""
    inputs = {n: store.reader(n, compute_key(cfg, store, n)) for n in stage_inputs(cfg, stage)}
    writer = store.writer(stage, key)
    display = StageProgress(stage, progress)  # a bar on a terminal, lines with rate and ETA in the log
    writer.folder = staged or key
    ctx = StageContext(with_world_models(cfg, inputs), store, stage, key, writer, inputs, display,
                       hooks or {}, shard_part)
    if shard_part is None:  # a fan-out part shares the folder with the other parts: it leaves their files alone
        remove_leftovers(store, stage, key)
    log.info("%s: computing %s", stage, writer.url)
    t0 = time.time()
    try:
        summary = spec.run_fn()(ctx) or {}
    except BaseException:
        if aside is not None:
            store.restore(aside, store.path(stage, key))
            log.warning("%s: forced recompute failed; the previous output is back at %s", stage, writer.url)
        if staged is not None and not shared:
            _drop(store, store.path(stage, staged))
            log.warning("%s: forced recompute failed; the previous output at %s was not touched", stage, writer.url)
        raise
    finally:
        display.close()
        if ctx.workdir is not None:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    summary.setdefault("seconds", round(time.time() - t0, 3))
    log.info("%s: computed in %.1f s", stage, time.time() - t0)
    if shard_part is not None:
        log.info("%s: part %s done in %s (stage not committed)", stage, shard_part,
                 store.stage_url(stage, staged) if staged else writer.url)
        return StageResult(stage, key, writer.url, False, {"summary": summary}, partial=True)
    manifest = writer.commit(
        config=stage_config(cfg, stage),
        inputs={n: {"key": r.key, "url": r.url} for n, r in inputs.items()},
        summary=summary,
        code_version=spec.code_version,
    )
    if staged is not None:
        store.promote(store.path(stage, staged), store.path(stage, key))
    for name in store.listdir(store.path(stage)):  # the new output is committed: now the old one may go
        if name.startswith((f".{key}.replaced-", f".{key}.staged-")):  # (also one left by a forced run that was killed)
            store.remove_tree(store.path(stage, name))
    return StageResult(stage, key, writer.url, False, manifest)


def _finish_promotion(store: ArtifactStore, stage: str, key: str) -> bool:
    """A forced run killed while promoting its complete staged output (``ArtifactStore.promote``): finish it.
    True when the stage is complete now."""
    staged = [n for n in store.listdir(store.path(stage)) if n.startswith(f".{key}.staged-")
              and store.read_json_manifest(store.path(stage, n, MANIFEST), "staged stage") is not None]
    if not staged or store.read_manifest(stage, key) is not None:
        return False
    log.info("%s: finishing the promotion of %s, a complete forced recompute an interrupted run left", stage, staged[0])
    store.promote(store.path(stage, staged[0]), store.path(stage, key))
    return store.read_manifest(stage, key) is not None


def _drop(store: ArtifactStore, path: str) -> None:
    """Best-effort removal of a failed run's staging folder (the stage's own error is what counts)."""
    try:
        store.remove_tree(path)
    except StorageError as e:
        log.warning("could not remove %s (%s); the next forced run of this key removes it", path, e)


def with_world_models(cfg: ComatConfig, inputs: dict[str, StageReader]) -> ComatConfig:
    """The config a stage runs with: ``world://`` model names replaced by local copies of the world stage's output."""
    if "world" not in inputs:
        return cfg
    from comat_core.stages.world import resolve_world_models

    return resolve_world_models(cfg, inputs["world"])


def verify_inputs(cfg: ComatConfig, store: ArtifactStore, stage: str) -> None:
    """Hash every file of the stage's inputs against their manifests (IntegrityError naming the first bad one)."""
    for name in stage_inputs(cfg, stage):
        store.reader(name, compute_key(cfg, store, name)).verify()


def _force_aside(cfg: ComatConfig, store: ArtifactStore, stage: str, key: str) -> str | None:
    """``force``: verify every input file first (a corrupt input fails here, before the old output is
    touched), then move the old output aside (restored if the recompute fails, removed after the
    commit). On stores where a rename copies every file (S3, GCS) the old output stays where it is and
    the recompute writes beside it (``staged`` in ``_compute``)."""
    verify_inputs(cfg, store, stage)
    return store.set_aside(store.path(stage, key)) if store.renames_cheaply else None


@dataclass
class StageStatus:
    stage: str
    key: str | None
    state: str  # complete | partial | missing | waiting | corrupt (``verify`` only)
    shards: int = 0
    detail: str = ""


def status(cfg: ComatConfig, store: ArtifactStore, verify: bool = False) -> list[StageStatus]:
    """Each stage's key and state under this config (for ``comat status``).

    Without ``verify`` a stage is complete when its manifest is there (cheap: the manifest is written
    last). With ``verify`` every file of a complete stage, and of each committed shard of a partial
    one, is read and hashed against its manifest; a mismatch makes the stage ``corrupt`` and names
    the files. A stage some run holds the lease of says who and since when (``held by ...``)."""
    out = []
    for stage in cfg.stage_order():
        try:
            key = compute_key(cfg, store, stage)
        except StorageError as e:
            out.append(StageStatus(stage, None, "waiting", detail=str(e)))
            continue
        manifest = store.read_manifest(stage, key)
        url = store.stage_url(stage, key)
        if manifest is not None:
            bad = StageReader(store, stage, key, manifest).problems() if verify else []
            if bad:
                out.append(StageStatus(stage, key, "corrupt", detail=f"{url}: {len(bad)} file(s) fail: "
                                       f"{', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}; "
                                       f"recompute with comat run --force {stage}"))
            else:
                out.append(StageStatus(stage, key, "complete", detail=url + (" (verified)" if verify else "")))
            continue
        writer = store.writer(stage, key)
        shards = writer.committed_shards()
        if verify:
            shards = [n for n in shards if writer.shard_problem(n) is None]  # a bad shard is redone on the next run
        state = "partial" if shards or store.exists(store.path(stage, key)) else "missing"
        others = other_outputs(cfg, store, stage) if state == "missing" else []
        if others:  # e.g. a training run with another layout: say where, and what differs
            url += f" (complete under other settings: {others[0][0]}, differing in {'; '.join(others[0][1][:2])})"
        out.append(StageStatus(stage, key, state, len(shards), url))
    for row in out:
        held = holders(store, row.stage, row.key) if row.key else []
        row.detail += "".join(f"; {h['name']} held by {describe(h)}" for h in held)
    return out
