"""Build the config from a request (CLI flags or flow parameters) and check it before any work.

``preflight`` fails fast, with one line, on what would otherwise fail halfway through a run: an
unreachable or unknown storage URL, a prompt source that matches nothing, a local model path that
does not exist, an unknown stage name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from comat_core.config import PRESETS, STAGE_NAMES, ComatConfig, load_config
from comat_core.errors import ConfigError, InputError

Preset = Literal[PRESETS]  # the run form's choices, from the one list of presets and of stages
StageName = Literal[STAGE_NAMES]


class ConfigRequest(BaseModel):
    """What to build the config from: the CLI's flags, and the ``config`` parameter of the flows.

    Typed so that Prefect's run form shows fields (the preset as a choice, overrides as a list) and
    a deployment refuses a bad value when the run is submitted.
    """

    model_config = ConfigDict(extra="forbid")

    preset: Preset | None = Field(None, description="base configuration (default tiny, or the one in config_file)")
    config_file: str | None = Field(None, description="YAML file merged over the preset (a path on the worker)")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE, e.g. train.max_steps=500")
    storage: str | None = Field(None, description="artifact store root: a local folder, s3://bucket/prefix, gs://...")
    prompts: list[str] | None = Field(None, description="prompt files or globs replacing the preset's sources")
    values: dict[str, Any] | None = Field(None, description="a resolved configuration (set by the pipeline for the "
                                                            "runs it starts; leave empty)")


def build_config(request: dict | ConfigRequest | ComatConfig | None) -> ComatConfig:
    """``{"preset", "config_file", "overrides", "storage", "prompts"}`` → a validated ``ComatConfig``."""
    if isinstance(request, ComatConfig):
        return request
    if isinstance(request, ConfigRequest):
        request = request.model_dump(exclude_none=True)
    request = dict(request or {})
    unknown = set(request) - {"preset", "config_file", "overrides", "storage", "prompts", "values"}
    if unknown:
        raise ConfigError(f"unknown config request field(s) {sorted(unknown)}; "
                          "use preset, config_file, overrides, storage, prompts, values")
    extra: dict = dict(request.get("values") or {})
    if request.get("storage"):
        extra.setdefault("storage", {})["root"] = request["storage"]
    if request.get("prompts"):
        extra.setdefault("prompts", {})["sources"] = list(request["prompts"])
    return load_config(request.get("preset"), request.get("config_file"), request.get("overrides"), extra)


def check_stage_names(cfg: ComatConfig, names: list[str] | None, what: str) -> None:
    if not names:
        return
    allowed = cfg.stage_order()
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ConfigError(f"unknown {what} stage(s) {', '.join(bad)} for preset {cfg.preset}; "
                          f"stages are {', '.join(allowed)}")


# What `hf download` fetches for each kind of model: configs, tokenizers and the safetensors weights of
# each component, never the multi-GB single-file .ckpt / .safetensors checkpoints at a pipeline's top level.
# `hf download` takes one pattern per --include (a second bare pattern would be read as a file name,
# and then every --include is ignored).
PIPELINE_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors",
                  "*/model.safetensors", "*/*.model")
MODEL_FILES = ("*.json", "*.txt", "*.model", "model.safetensors")
PIPELINE_FIELDS = ("pretrained", "discriminator")  # diffusers pipelines; the rest are single models (or a VAE)


def check_models(cfg: ComatConfig, stages: list[str] | None = None) -> None:
    """Every model the selected stages need must be there before any work starts.

    Local paths must exist. With ``HF_HUB_OFFLINE=1`` every Hub id must be in the Hub cache; the
    error lists each missing one, on one line, with the ``hf download`` command that fetches it
    (configs and safetensors only). Online, Hub ids are downloaded when first loaded.
    """
    from comat_core.models.loader import is_local, is_tiny, is_world
    from comat_core.stages.registry import STAGES

    import os

    for name, value in cfg.models.model_dump().items():
        if isinstance(value, str) and is_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise InputError(f"models.{name}: model path does not exist: {value} "
                             "(use a Hugging Face id or an existing folder)")
    if not _hub_offline():
        return
    fields = {f for s in (stages or cfg.stage_order()) if s in STAGES for f in STAGES[s].models}
    missing = []
    for field in sorted(fields):
        value = getattr(cfg.models, field)
        if field in ("family", "sam_model_type", "sam_checkpoint") or not isinstance(value, str):
            continue
        if is_tiny(value) or is_world(value) or is_local(value) or _in_hub_cache(value):
            continue
        files = PIPELINE_FILES if field in PIPELINE_FIELDS else MODEL_FILES
        includes = " ".join(f'--include "{f}"' for f in files)
        missing.append(f"models.{field}={value} (hf download {value} {includes})")
    if missing:
        raise InputError(f"HF_HUB_OFFLINE=1 and {len(missing)} model(s) are not in the Hub cache "
                         f"({_hub_cache()}): " + "; ".join(missing))


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


def preflight(cfg: ComatConfig, stages: list[str] | None = None, force: list[str] | None = None) -> None:
    from comat_core.stages.prompts import collect_prompts
    from comat_core.store.storage import ArtifactStore

    check_stage_names(cfg, stages, "--stages")
    check_stage_names(cfg, force, "--force")
    ArtifactStore(cfg.storage.root, cfg.storage.options).check_reachable()
    if stages is None or "prompts" in stages:
        collect_prompts(cfg.prompts, cfg.storage.options)  # every file exists, is UTF-8 and not empty
    check_models(cfg, stages)
