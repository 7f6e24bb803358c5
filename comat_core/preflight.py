"""Build the config from a request (CLI flags or flow parameters) and check it before any work.

``preflight`` fails fast, with one line, on what would otherwise fail halfway through a run: an
unreachable or unknown storage URL, a prompt source that matches nothing, a local model path that
does not exist, an unknown stage name.
"""

from __future__ import annotations

from comat_core.config import ComatConfig, load_config
from comat_core.errors import ConfigError, InputError


def build_config(request: dict | ComatConfig | None) -> ComatConfig:
    """``{"preset", "config_file", "overrides", "storage", "prompts"}`` → a validated ``ComatConfig``."""
    if isinstance(request, ComatConfig):
        return request
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


def check_models(cfg: ComatConfig) -> None:
    """Local model paths must exist (hub ids and tiny:// names are resolved when loaded)."""
    from comat_core.models.loader import is_local

    import os

    for name, value in cfg.models.model_dump().items():
        if isinstance(value, str) and is_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise InputError(f"models.{name}: model path does not exist: {value} "
                             "(use a Hugging Face id or an existing folder)")


def preflight(cfg: ComatConfig, stages: list[str] | None = None, force: list[str] | None = None) -> None:
    from comat_core.stages.prompts import collect_prompts
    from comat_core.store.storage import ArtifactStore

    check_stage_names(cfg, stages, "--stages")
    check_stage_names(cfg, force, "--force")
    ArtifactStore(cfg.storage.root, cfg.storage.options).check_reachable()
    if stages is None or "prompts" in stages:
        collect_prompts(cfg.prompts, cfg.storage.options)  # every file exists, is UTF-8 and not empty
    check_models(cfg)
