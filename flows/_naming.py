"""Flow-run names that tell runs apart: preset, config hash @ storage hash, stages, e.g.
``tiny 3f9a1c@7b2e01: prompts > gan_gt > ... (force train)``.

The config hash covers everything that was set (overrides, a config file, prompt files, storage);
the storage hash is the one in the pipeline's artifact keys (``tasks.artifacts.pipeline_scope``),
so a run's name, its artifacts and its storage root point at each other. A request whose config
cannot be built is named ``<preset>: refused, config not valid ...``: the run stops at its config check.
"""

from __future__ import annotations

import hashlib
import json


def describe(config: dict | None, stages: list[str] | None, force: list[str] | None = None) -> str:
    from comat_core.config import build_config
    from comat_core.store.storage import ArtifactStore
    from tasks.artifacts import pipeline_scope

    try:
        cfg = build_config(config)
        preset, order = cfg.preset, cfg.stage_order()
        values = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str)
        store_hash = pipeline_scope(preset, ArtifactStore(cfg.storage.root, cfg.storage.options).root_url)
        label = f"{preset} {hashlib.sha256(values.encode()).hexdigest()[:6]}@{store_hash.rsplit('-', 1)[-1]}"
    except Exception:  # noqa: BLE001 - a name must never fail the run; the flow refuses it with the error
        preset = config.get("preset") if isinstance(config, dict) else getattr(config, "preset", None)
        return f"{preset or 'comat'}: refused, config not valid (the error is in the run's logs)"
    chosen = [s for s in order if not stages or s in stages]
    text = f"{label}: {' > '.join(chosen) or 'no stages'}"
    return text + (f" (force {', '.join(force)})" if force else "")


def parent_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return describe(p.get("config"), p.get("stages"), p.get("force"))


def stage_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    stage = flow_run.flow_name.removeprefix("comat-").replace("-", "_")
    name = describe(p.get("config"), [stage], [stage] if p.get("force") else None)
    part = p.get("part")
    return f"{name} [part {part[0] + 1}/{part[1]}]" if part and len(part) == 2 else name
