"""The parent flow ``comat``: every stage of the config, in pipeline order, each through its task.

    comat(config={"preset": "tiny"}, stages=None, force=None, dispatch="inline") -> {stage: artifact URL}

``config`` is a config request (``preset``, ``config_file``, ``overrides``, ``storage``, ``prompts``,
``values``; see ``comat_core.preflight.build_config``). It is resolved and checked once, here, and
the stages receive the resolved values, so a worker never needs the YAML file. ``stages`` restricts
the run to a subset (kept in pipeline order; their inputs must already be in storage). ``force``
recomputes the named stages; their dependants recompute because their keys change, everything else
is a cache hit. Storage is ``cfg.storage.root``: a local folder, ``s3://bucket/prefix`` (endpoint
and credentials from the standard AWS variables, ``AWS_ENDPOINT_URL``, or ``storage.options``), …

``dispatch``:

* ``inline`` (default): every stage is a task of this flow run, in this process. ``comat run`` does
  this on Prefect's embedded server; no server or worker is needed.
* ``deployments``: every stage runs as a flow run of its own deployment (``comat-<stage>/gpu`` on the
  GPU pool, ``comat-prompts/cpu`` on the CPU pool; see deployments/prefect.yaml), one after the
  other, so GPU requests sit with the stages that need them while this parent waits on a CPU
  worker. Each child resolves its inputs from storage; the parent reads the stage URL back from the
  store (the manifest must be there).
"""

from __future__ import annotations

import logging
from typing import Literal

from prefect import flow

from comat_core.config import ComatConfig
from comat_core.errors import StorageError
from comat_core.pipeline import STAGES, compute_key
from comat_core.preflight import build_config, preflight
from flows._naming import parent_run_name
from tasks.stage import config_payload, open_store, run_stage_task

log = logging.getLogger("comat.flows")


def stage_deployment(stage: str) -> str:
    """``<flow name>/<deployment name>`` of a stage's own deployment in deployments/prefect.yaml."""
    return f"comat-{stage.replace('_', '-')}/{'gpu' if STAGES[stage].gpu else 'cpu'}"


def run_stage_deployment(stage: str, cfg: ComatConfig, force: bool) -> str:
    """Run one stage as a flow run of its deployment (a subflow in the UI), wait, return its URL."""
    from prefect.deployments import run_deployment

    child = run_deployment(stage_deployment(stage), parameters={"config": config_payload(cfg), "force": force},
                           timeout=None, poll_interval=2)
    if not (child.state and child.state.is_completed()):
        raise RuntimeError(f"{stage}: flow run {child.name!r} of {stage_deployment(stage)} ended "
                           f"{child.state.name if child.state else 'without a state'}; see its logs in the UI")
    store = open_store(cfg)
    key = compute_key(cfg, store, stage)
    if store.read_manifest(stage, key) is None:
        raise StorageError(f"{stage}: {stage_deployment(stage)} completed but {store.stage_url(stage, key)} "
                           "has no manifest; does the worker use the same storage?")
    return store.stage_url(stage, key)


@flow(name="comat", flow_run_name=parent_run_name, validate_parameters=True)
def comat(config: dict | None = None, stages: list[str] | None = None, force: list[str] | None = None,
          dispatch: Literal["inline", "deployments"] = "inline") -> dict[str, str]:
    """Run the CoMat pipeline (prompts > [sdxl_prefinetune] > gan_gt > masks > train > evaluate)."""
    cfg = build_config(config)
    preflight(cfg, stages=stages, force=force)
    order = [s for s in cfg.stage_order() if not stages or s in stages]
    skipped = sorted(set(force or []) - set(order))
    if skipped:
        log.warning("force %s ignored: not among the stages run (%s)", ", ".join(skipped), ", ".join(order))
    run = run_stage_deployment if dispatch == "deployments" else run_stage_task
    return {stage: run(stage, cfg, stage in (force or [])) for stage in order}


if __name__ == "__main__":
    print(comat())
