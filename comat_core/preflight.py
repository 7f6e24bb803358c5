"""Check a config (built from the CLI's flags or the flows' parameters by ``config.build_config``) before any work.

``preflight`` fails fast, with one line, on what would otherwise fail halfway through a run: an
unreachable or unknown storage URL, a prompt source that matches nothing (or a folder, a bad line),
a local model path that does not exist or holds no model, a ``--stages`` run whose inputs are
missing, an unknown stage name. ``check_this_machine`` adds, for ``comat run``, the Hugging Face ids
that are not downloaded while HF_HUB_OFFLINE=1 (with one ``hf download`` command per model, each on a
line of its own after the error's line) and ``runtime.device=cuda`` without a GPU, checked
only for the stages that will be computed (not when everything is a cache hit).
"""

from __future__ import annotations

import os

from comat_core.config import ComatConfig
from comat_core.errors import ConfigError, InputError


def check_stage_names(cfg: ComatConfig, names: list[str] | None, what: str) -> None:
    if not names:
        return
    allowed = cfg.stage_order()
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"unknown {what} stage(s) {', '.join(bad)} for preset {cfg.preset}; "
                          f"stages are {', '.join(allowed)}")


# What `hf download` fetches for each kind of model: configs, tokenizers and the safetensors weights of the
# components comat loads, never the multi-GB single-file .ckpt / .safetensors checkpoints at a pipeline's top
# level, the fp16 copies or the safety checker. The README's download list is these commands, model by model.
# `hf download` takes one pattern per --include (a second bare pattern would be read as a file name,
# and then every --include is ignored).
PIPELINE_FILES = ("*.json", "*.txt", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                  "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")
MODEL_FILES = ("*.json", "*.txt", "model.safetensors")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
PIPELINE_FIELDS = ("pretrained", "discriminator")  # diffusers pipelines; the rest are single models (or a VAE)

# What each model setting must name when it is a local path: (marker files, one of which must be there; what).
_PIPELINE = (("model_index.json",), "a diffusers pipeline folder (with model_index.json)")
_TRANSFORMERS = (("config.json",), "a transformers model folder (with config.json)")
MODEL_FOLDERS = {
    "pretrained": _PIPELINE,
    "discriminator": _PIPELINE,
    "vae": (("config.json", "model_index.json", "vae/config.json"), "a diffusers VAE folder (config.json) or a pipeline folder"),
    "captioner": _TRANSFORMERS, "vqa": _TRANSFORMERS, "clip": _TRANSFORMERS,
    "grounding_dino": _TRANSFORMERS, "sam": _TRANSFORMERS,
}


def model_fields(cfg: ComatConfig, stages: list[str]) -> list[str]:
    """The ``models.*`` settings naming a model that these stages load."""
    from comat_core.stages.registry import STAGES, stage_models

    unused = {"family", "sam_model_type", "sam_checkpoint" if cfg.masks.backend == "hf" else "sam"}
    fields = {f for s in stages if s in STAGES for f in stage_models(cfg, s)} - unused
    return [f for f in type(cfg.models).model_fields if f in fields and getattr(cfg.models, f)]


def check_model_paths(cfg: ComatConfig) -> None:
    """Local model paths must be what their setting expects: an existing folder with the right marker file
    (a pipeline's model_index.json, a model's config.json), or for ``sam_checkpoint`` a file. The folder's
    JSON must read, name the family or model type the setting loads, and come with safetensors weights and
    no code of its own (``models.loader.check_pipeline_folder`` / ``check_model_folder``)."""
    from pathlib import Path

    from comat_core.models.loader import check_model_folder, check_pipeline_folder, is_local, is_tiny, is_world

    for name in type(cfg.models).model_fields:
        value = getattr(cfg.models, name)
        if not isinstance(value, str) or name in ("family", "sam_model_type") or is_tiny(value) or is_world(value):
            continue
        path = os.path.expanduser(value)
        if name == "sam_checkpoint":
            if not os.path.isfile(path):
                raise InputError(f"models.sam_checkpoint: {value} is {_what_is(path)}; expected a segment_anything "
                                 "checkpoint file (e.g. sam_vit_h_4b8939.pth)")
            continue
        if not (is_local(value) or os.path.exists(path)):
            continue  # a Hugging Face id
        markers, expected = MODEL_FOLDERS[name]
        if not os.path.exists(path):
            raise InputError(f"models.{name}: model path does not exist: {value} "
                             f"(use a Hugging Face id or an existing folder: {expected})")
        if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, m)) for m in markers):
            raise InputError(f"models.{name}: {value} is {_what_is(path)}; expected {expected}")
        if name == "discriminator":  # always read as an SD1.5 pipeline, whatever models.family is
            check_pipeline_folder(Path(path), "sd15", f"models.{name}: {value}",
                                  "the discriminator starts from an SD1.5 UNet: use an SD1.5 pipeline folder")
        elif name in PIPELINE_FIELDS:
            check_pipeline_folder(Path(path), cfg.models.family, f"models.{name}: {value}")
        else:
            check_model_folder(name, Path(path), f"models.{name}: {value}")


def _what_is(path: str) -> str:
    if not os.path.exists(path):
        return "missing"
    if os.path.isfile(path):
        return f"a file ({os.path.getsize(path):,} bytes)"
    entries = sorted(os.listdir(path))
    shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
    return f"a folder without a model ({shown or 'empty'})"


def download_command(field: str, repo_id: str) -> str:
    """The ``hf download`` command that fetches what comat loads of ``models.<field>`` (configs, safetensors)."""
    files = PIPELINE_FILES if field in PIPELINE_FIELDS else VAE_FILES if field == "vae" else MODEL_FILES
    return f"hf download {repo_id} " + " ".join(f'--include "{f}"' for f in files)


def check_models(cfg: ComatConfig, stages: list[str] | None = None) -> None:
    """Every model the given stages need must be there before any work starts.

    Local paths must be model folders (``check_model_paths``). With ``HF_HUB_OFFLINE=1`` every Hub id
    must be in the Hub cache; the error's first line names the settings whose model is missing, and
    each following line is the ``hf download`` command of one model (configs and safetensors only),
    ready to copy. Online, a Hub id not in the cache must exist on the Hub (``check_hub_ids``); it is
    downloaded when first loaded.
    """
    check_model_paths(cfg)
    stages = stages if stages is not None else cfg.stage_order()
    if not _hub_offline():
        check_hub_ids(cfg, stages)
        return
    missing: dict[str, list[str]] = {}  # Hub id -> the settings naming it (SD1.5 is pretrained and discriminator)
    for field, value in hub_ids_not_cached(cfg, stages):
        missing.setdefault(value, []).append(field)
    if missing:
        named = "; ".join(f"{value} ({', '.join('models.' + f for f in fields)})" for value, fields in missing.items())
        commands = [download_command(fields[0], value) for value, fields in missing.items()]
        raise InputError(f"HF_HUB_OFFLINE=1 and {len(missing)} model(s) are not in the Hub cache ({_hub_cache()}): "
                         f"{named}; download them with these commands, one per line:\n" + "\n".join(commands))


def hub_ids_not_cached(cfg: ComatConfig, stages: list[str]) -> list[tuple[str, str]]:
    """``(field, Hub id)`` of each model these stages load that names a Hub id not in the Hub cache (not
    comat's own tiny:// or world:// models, not a local path), by field name."""
    from comat_core.models.loader import is_local, is_tiny, is_world

    out = []
    for field in sorted(model_fields(cfg, stages)):
        value = getattr(cfg.models, field)
        if field == "sam_checkpoint" or not isinstance(value, str):
            continue
        if not (is_tiny(value) or is_world(value) or is_local(value) or os.path.exists(value) or _in_hub_cache(value)):
            out.append((field, value))
    return out


def check_hub_ids(cfg: ComatConfig, stages: list[str], timeout: float = 15.0) -> None:
    """Online: every Hub id these stages load that is not in the Hub cache must exist and be readable
    on the Hub now (one metadata request each), so a wrong id, a gated model without a token or no
    network is named before any stage computes, not when the stage that loads it gets there."""
    ids = hub_ids_not_cached(cfg, stages)
    if not ids:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi()
    for field, value in ids:
        try:
            api.model_info(value, timeout=timeout)
        except GatedRepoError:
            raise InputError(f"models.{field}={value} is gated on the Hub: accept its terms there and set "
                             "HF_TOKEN, or download it and set HF_HUB_OFFLINE=1") from None
        except RepositoryNotFoundError:
            raise InputError(f"models.{field}={value}: no such model on the Hub (or it is private: set "
                             "HF_TOKEN); fix the id or use a local folder") from None
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a timeout: the stage's download would fail too
            raise InputError(f"models.{field}={value} is not in the Hub cache ({_hub_cache()}) and the Hub "
                             f"is not reachable ({type(e).__name__}); download it where there is a network "
                             "and set HF_HUB_OFFLINE=1") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _in_hub_cache(repo_id: str) -> bool:
    """The Hub cache holds at least one snapshot of ``repo_id`` with files in it."""
    from pathlib import Path

    snapshots = Path(_hub_cache()) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(any(s.iterdir()) for s in snapshots.iterdir() if s.is_dir())


def _store(cfg: ComatConfig):
    from comat_core.store.storage import ArtifactStore

    return ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout)


def stages_to_compute(cfg: ComatConfig, stages: list[str] | None, force: list[str] | None) -> list[str]:
    """The stages this run will compute, not find complete: forced ones and their dependants, and every
    stage without a manifest at its key (or whose key cannot be known yet because an input is missing)."""
    from comat_core.errors import StorageError
    from comat_core.stages.registry import compute_key, downstream

    store = _store(cfg)
    forced = downstream(cfg, set(force or []))
    out = []
    for stage in [s for s in cfg.stage_order() if not stages or s in stages]:
        if stage in forced:
            out.append(stage)
            continue
        try:
            key = compute_key(cfg, store, stage)
        except StorageError:
            out.append(stage)
            continue
        if store.read_manifest(stage, key) is None:
            out.append(stage)
    return out


def check_inputs_exist(cfg: ComatConfig, stages: list[str] | None) -> None:
    """With ``--stages``, every input of a selected stage that is not itself selected must be complete."""
    from comat_core.errors import StorageError
    from comat_core.stages.registry import compute_key, missing_input_advice, stage_inputs

    if not stages:
        return
    store = _store(cfg)
    for stage in [s for s in cfg.stage_order() if s in stages]:
        for name in stage_inputs(cfg, stage):
            if name in stages:
                continue
            try:
                key = compute_key(cfg, store, name)
                where = store.stage_url(name, key)
                complete = store.read_manifest(name, key) is not None
            except StorageError:
                where, complete = f"{store.root_url}/{name}", False
            if not complete:
                advice = missing_input_advice(cfg, store, name, f"run it first (comat run --stages {name}) "
                                                                "or add it to --stages")
                raise InputError(f"stage {stage} needs {name}, which has no complete output at {where}; {advice}")


def check_device(cfg: ComatConfig) -> None:
    if cfg.runtime.device == "cuda":
        from comat_core.runtime import resolve_device  # imports torch: only when a GPU is asked for

        resolve_device(cfg)


def preflight(cfg: ComatConfig, stages: list[str] | None = None, force: list[str] | None = None) -> None:
    """Everything that can be checked anywhere before a stage runs: names, storage, prompt files, model paths."""
    from comat_core.stages.prompts import collect_prompts

    check_stage_names(cfg, stages, "--stages")
    check_stage_names(cfg, force, "--force")
    _store(cfg).check_reachable()
    if stages is None or "prompts" in stages:
        collect_prompts(cfg.prompts, cfg.storage.options)  # every file exists, is UTF-8, not empty, clean lines
    check_model_paths(cfg)
    check_inputs_exist(cfg, stages)


def check_this_machine(cfg: ComatConfig, stages: list[str] | None = None, force: list[str] | None = None) -> None:
    """What only the machine that computes can check: the Hugging Face ids of the stages it will
    compute are in its cache (under HF_HUB_OFFLINE=1), and a GPU is there when runtime.device=cuda.

    ``comat run`` (stages in-process) calls it after ``preflight``, so does the parent flow when its
    stages run in its process, and each stage flow for its stage; the parent flow does not with
    ``dispatch=deployments``: it runs on a CPU worker while the stages run on GPU workers with their own caches."""
    todo = stages_to_compute(cfg, stages, force)
    if todo:
        check_models(cfg, todo)
        check_device(cfg)
