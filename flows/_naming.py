"""Flow-run names that say the preset and the stages, e.g. ``tiny: prompts > gan_gt > ... (force train)``."""

from __future__ import annotations


def describe(config: dict | None, stages: list[str] | None, force: list[str] | None = None) -> str:
    from comat_core.preflight import build_config

    try:
        cfg = build_config(config)
        preset, order = cfg.preset, cfg.stage_order()
    except Exception:  # noqa: BLE001 - a name must never fail the run; the flow reports the error
        preset, order = (config or {}).get("preset") or "config", list(stages or [])
    chosen = [s for s in order if not stages or s in stages]
    text = f"{preset}: {' > '.join(chosen) or 'no stages'}"
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
