"""Prefect events of the pipeline, for automations (``deployments/automations.yaml``) and the UI's Events page.

* ``comat.stage.completed`` when a stage task ends with its output complete in storage, computed
  or cached. Resource ``comat.stage.<stage>.<key>`` with labels ``comat.stage``, ``comat.key``,
  ``comat.cached`` ("true"/"false"), ``comat.preset``, ``comat.flow`` (the flow that ran the task:
  ``comat`` for the pipeline, ``comat-<stage>`` for a stage deployment). Payload: url, seconds,
  the headline figures (train: final losses; evaluate: base/tuned/delta per category) and
  ``config``, the request that rebuilds this exact config (so an automation can run the next stage).
* ``comat.train.checkpoint`` each time training commits a checkpoint: step and folder.

Emitting never fails a stage: events are best effort, like artifacts.
"""

from __future__ import annotations

import logging

log = logging.getLogger("comat.events")


def _emit(event: str, resource: dict, payload: dict) -> None:
    from prefect.events import emit_event

    from comat_core.store.credentials import redact_obj

    try:
        emit_event(event=event, resource=redact_obj(resource), payload=redact_obj(payload))
    except Exception as e:  # noqa: BLE001 - an event must never fail the stage it reports
        log.warning("could not emit %s: %s: %s", event, type(e).__name__, e)


def headline(stage: str, summary: dict) -> dict:
    """A few figures of a stage's manifest summary worth seeing in an event or a notification."""
    if stage == "train":
        return {"steps": summary.get("steps"), **{k: v for k, v in (summary.get("final") or {}).items()}}
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and k != "seconds"}


def stage_completed(cfg, result, seconds: float, config_request: dict, flow_name: str,
                    figures: dict | None = None) -> None:
    resource = {"prefect.resource.id": f"comat.stage.{result.stage}.{result.key}",
                "prefect.resource.name": f"{result.stage}-{result.key}",
                "comat.stage": result.stage, "comat.key": result.key, "comat.cached": str(result.cached).lower(),
                "comat.preset": cfg.preset, "comat.flow": flow_name}
    payload = {"url": result.url, "seconds": round(seconds, 3), "cached": result.cached,
               "figures": figures if figures is not None else headline(result.stage, result.manifest.get("summary", {})),
               "config": config_request}
    _emit("comat.stage.completed", resource, payload)


def checkpoint_hook(cfg, stage_key: str):
    """A trainer hook ``on_checkpoint(step, folder)`` that emits ``comat.train.checkpoint``."""
    def on_checkpoint(step: int, folder: str) -> None:
        _emit("comat.train.checkpoint",
              {"prefect.resource.id": f"comat.stage.train.{stage_key}", "prefect.resource.name": f"train-{stage_key}",
               "comat.stage": "train", "comat.key": stage_key, "comat.preset": cfg.preset},
              {"step": step, "folder": folder})

    return on_checkpoint
