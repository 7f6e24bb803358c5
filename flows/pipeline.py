"""The parent flow ``comat``: every stage of the config, in pipeline order, each through its task.

    comat(config={"preset": "tiny"}, stages=None, force=None, dispatch="inline", parallelism=1)
        -> {stage: artifact URL}

``config`` is a config request (``preset``, ``config_file``, ``overrides``, ``storage``, ``prompts``,
``values``; see ``comat_core.config.build_config``). It is resolved and checked once, here, and
the stages receive the resolved values, so a worker never needs the YAML file. ``stages`` restricts
the run to a subset (kept in pipeline order; their inputs must already be in storage). ``force``
recomputes the named stages; their dependants recompute when the output changed (new keys), everything else
is a cache hit. Storage is ``cfg.storage.root``: a local folder, ``s3://bucket/prefix`` (endpoint
from ``AWS_ENDPOINT_URL`` or ``storage.options``, credentials from the standard AWS variables only:
``storage.options`` refuses them, since this flow's parameters are stored in Prefect's database), …

``dispatch``:

* ``inline`` (default): every stage is a task of this flow run, in this process. ``comat run`` does
  this on Prefect's embedded server; no server or worker is needed.
* ``deployments``: every stage runs as a flow run of its own deployment (``comat-<stage>/gpu`` on the
  GPU pool, ``comat-prompts/cpu`` on the CPU pool; see deployments/prefect.yaml), one after the
  other, so GPU requests sit with the stages that need them while this parent waits on a CPU
  worker. Each child resolves its inputs from storage; the parent reads the stage URL back from the
  store (the manifest must be there).

``parallelism`` (``dispatch="deployments"`` only): the sharded stages (``sdxl_prefinetune`` and
``evaluate`` generation, ``gan_gt``, ``masks``) fan out. The parent submits ``parallelism`` flow runs
of the stage's deployment with ``part=[k, parallelism]``, each computing one contiguous slice of the
stage's shards without committing the stage (``comat_core/store/shards.py``), so every free worker of the
GPU pool takes one. It waits for all of them, puts a failed or crashed part back in the queue (the
same flow run, up to ``SHARD_RUN_RETRIES`` times; its completed shards are not redone), and then
runs the stage's deployment once more without ``part``: that run verifies every shard (sha256),
computes any still missing, does the stage's non-sharded rest (``gan_gt`` preview, the SDXL
fine-tune, ``evaluate`` scoring and report) and commits the manifest. ``force`` verifies the stage's
inputs once, then gives every run of the fan-out one staging folder beside the old output
(``staged``): the parts write their shards there, the last run commits there and promotes it over
the old output, which stays complete and readable until then, and stays as it was when the fan-out
fails or is killed (the staging folder is removed, or left for the next commit of that key to remove). ``parallelism`` is a flow parameter and not a config field because
it says where work runs, not what it computes: it never enters a stage key, and ``comat run``
(in-process) has no workers to spread over.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from prefect import flow
from prefect.states import Failed, State

from comat_core.config import ComatConfig, ConfigRequest, StageName, build_config
from comat_core.errors import ComatError, ConfigError, StorageError
from comat_core.stages.registry import STAGES, compute_key, staging_folder, verify_inputs
from comat_core.preflight import check_this_machine, preflight
from flows._naming import parent_run_name
from tasks.logs import forward_to_runs
from tasks.stage import config_payload, open_store, run_stage_task

log = logging.getLogger("comat.flows")

SHARD_RUN_RETRIES = 2  # a failed or crashed part is queued again at most this many times
POLL_SECONDS = 2.0


def stage_deployment(stage: str) -> str:
    """``<flow name>/<deployment name>`` of a stage's own deployment in deployments/prefect.yaml."""
    return f"comat-{stage.replace('_', '-')}/{'gpu' if STAGES[stage].gpu else 'cpu'}"


def run_stage_deployment(stage: str, cfg: ComatConfig, force: bool, staged: str | None = None) -> str:
    """Run one stage as a flow run of its deployment (a subflow in the UI), wait, return its URL.

    ``staged``: the commit of a forced fan-out (``run_stage_fanout``)."""
    from prefect.deployments import run_deployment

    parameters = {"config": config_payload(cfg), "force": force} | ({"staged": staged} if staged else {})
    child = run_deployment(stage_deployment(stage), parameters=parameters, timeout=None, poll_interval=2)
    if not (child.state and child.state.is_completed()):
        raise RuntimeError(f"{stage}: flow run {child.name!r} of {stage_deployment(stage)} ended "
                           f"{child.state.name if child.state else 'without a state'}; see its logs in the UI")
    store = open_store(cfg)
    key = compute_key(cfg, store, stage)
    if store.read_manifest(stage, key) is None:
        raise StorageError(f"{stage}: {stage_deployment(stage)} completed but {store.stage_url(stage, key)} "
                           "has no manifest; does the worker use the same storage?")
    return store.stage_url(stage, key)


def run_stage_fanout(stage: str, cfg: ComatConfig, force: bool, parts: int) -> str:
    """Fan a sharded stage out to ``parts`` flow runs of its deployment, then commit it with one more run."""
    from prefect.deployments import run_deployment

    store = open_store(cfg)
    key = compute_key(cfg, store, stage)
    staged = None
    if force:
        verify_inputs(cfg, store, stage)  # a corrupt input fails here, before anything is written
        staged = staging_folder(key)  # one for all the runs of this fan-out: the old output is not touched
        log.info("%s: forced fan-out into %s; %s stays as it is until the new output is complete", stage,
                 store.stage_url(stage, staged), store.stage_url(stage, key))
    elif store.read_manifest(stage, key) is not None:
        log.info("%s: complete at %s, nothing to fan out", stage, store.stage_url(stage, key))
        return store.stage_url(stage, key)
    extra = {"staged": staged} if staged else {}
    try:
        runs = {k: run_deployment(stage_deployment(stage), timeout=0, parameters={
            "config": config_payload(cfg), "force": False, "part": [k, parts]} | extra) for k in range(parts)}
        log.info("%s: %d parts submitted to %s: %s", stage, parts, stage_deployment(stage),
                 ", ".join(r.name for r in runs.values()))
        wait_for_parts(stage, runs)
        return run_stage_deployment(stage, cfg, force=False, staged=staged)
    except BaseException:
        if staged:
            drop_staging(store, stage, staged)
            log.warning("%s: the forced fan-out failed; the previous output at %s was not touched", stage,
                        store.stage_url(stage, key))
        raise


def drop_staging(store, stage: str, staged: str) -> None:
    """Best effort: a failed forced fan-out's staging folder (the next commit of its key removes it otherwise)."""
    try:
        store.remove_tree(store.path(stage, staged))
    except Exception as e:  # noqa: BLE001 - the fan-out's own error is what counts
        log.warning("could not remove %s (%s); the next commit of this key removes it", store.path(stage, staged), e)


def wait_for_parts(stage: str, runs: dict, retries: int = SHARD_RUN_RETRIES, poll: float = POLL_SECONDS) -> None:
    """Wait until every part's flow run completed; queue a failed or crashed one again (same flow run)."""
    from prefect import get_client
    from prefect.states import AwaitingRetry

    attempts = {k: 1 for k in runs}
    pending = {k: r.id for k, r in runs.items()}
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll)
            for k, run_id in list(pending.items()):
                run = client.read_flow_run(run_id)
                if run.state is None or not run.state.is_final():
                    continue
                if run.state.is_completed():
                    del pending[k]
                    log.info("%s: part %d/%d (%r) completed; %d still running", stage, k + 1, len(runs), run.name,
                             len(pending))
                    continue
                if run.state.is_cancelled() or attempts[k] > retries:
                    raise RuntimeError(f"{stage}: part {k + 1}/{len(runs)} ({run.name!r}) ended {run.state.name} "
                                       f"after {attempts[k]} attempt(s); its completed shards are kept, rerun the "
                                       "pipeline to finish the stage")
                log.warning("%s: part %d/%d (%r) ended %s; queued again (attempt %d of %d)", stage, k + 1, len(runs),
                            run.name, run.state.name, attempts[k] + 1, retries + 1)
                client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
                attempts[k] += 1


@flow(name="comat", flow_run_name=parent_run_name, validate_parameters=True)
def comat(config: ConfigRequest | None = None, stages: list[StageName] | None = None,
          force: list[StageName] | None = None, dispatch: Literal["inline", "deployments"] = "inline",
          parallelism: int = 1) -> dict[str, str]:
    """Run the CoMat pipeline (prompts > [sdxl_prefinetune] > gan_gt > masks > train > evaluate).

    ``config``: preset, config file, overrides, storage, prompts. ``stages``: only these (their inputs
    must be in storage). ``force``: recompute these. ``dispatch``/``parallelism``: see the module."""
    forward_to_runs()
    try:
        scrub_submitted_credentials(config)
        if parallelism < 1:
            raise ConfigError(f"parallelism must be at least 1, not {parallelism}")
        if parallelism > 1 and dispatch != "deployments":
            raise ConfigError("parallelism > 1 spreads shards over the workers of the GPU pool: use "
                              "dispatch=deployments (the comat/full-pipeline-fanout deployment)")
        require_storage(config)
        cfg = build_config(config)
        preflight(cfg, stages=stages, force=force)
        if dispatch == "inline":  # the stages compute in this process: their models must be here (a GPU too)
            check_this_machine(cfg, stages=stages, force=force)
    except ComatError as e:
        return refuse(e)
    order = [s for s in cfg.stage_order() if not stages or s in stages]
    skipped = sorted(set(force or []) - set(order))
    if skipped:
        log.warning("force %s ignored: not among the stages run (%s)", ", ".join(skipped), ", ".join(order))

    def run(stage: str, forced: bool) -> str:
        if dispatch == "inline":
            return run_stage_task(stage, cfg, forced)
        if parallelism > 1 and STAGES[stage].sharded:
            return run_stage_fanout(stage, cfg, forced, parallelism)
        return run_stage_deployment(stage, cfg, forced)

    started, results, current = time.time(), {}, ""
    try:
        for stage in order:
            current = stage
            results[stage] = run(stage, stage in (force or []))
    except BaseException as e:
        publish_run_summary(cfg, results, started, failed=(current, e))
        raise
    publish_run_summary(cfg, results, started)
    return results


def scrub_submitted_credentials(config) -> None:
    """A credential in the submitted ``config`` (storage options in ``values`` or an override) is already in
    Prefect's database as this flow run's parameters: overwrite them with the credential masked, then refuse
    the run (``ConfigError``, naming the fields, never quoting them). See docs/credentials.md for what remains."""
    from prefect import get_client
    from prefect.runtime import flow_run

    from comat_core.store.credentials import redact_request

    request = config.model_dump(exclude_none=True) if isinstance(config, ConfigRequest) else config
    clean, found = redact_request(request)
    if not found:
        return
    masked = "could not be masked in this run's stored parameters (delete the flow run)"
    if flow_run.id:
        try:
            with get_client(sync_client=True) as client:
                client.update_flow_run(flow_run.id, parameters={**(flow_run.parameters or {}), "config": clean})
            masked = "was masked in this run's stored parameters"
        except Exception as e:  # noqa: BLE001 - the refusal below is what counts
            log.warning("could not mask the credential in flow run %s's parameters: %s", flow_run.id, type(e).__name__)
    raise ConfigError(f"{', '.join(found)} holds a credential, which {masked}; remove it and set the standard "
                      "variables on the workers instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN "
                      "or AWS_PROFILE for S3, GOOGLE_APPLICATION_CREDENTIALS for gs://)")


def require_storage(config) -> None:
    """A deployment run must name its storage: the preset's default (``./comat-artifacts/...``) would
    resolve inside the worker's code folder, where no other worker or run finds it."""
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:  # comat run, or a flow called in-process: the default folder is fine
        return
    request = config.model_dump(exclude_none=True) if isinstance(config, ConfigRequest) else dict(config or {})
    values = request.get("values") or {}
    if request.get("storage") or request.get("config_file") or (values.get("storage") or {}).get("root"):
        return
    raise ConfigError(f"deployment {flow_run.flow_name}/{deployment.name} needs config.storage (the artifact "
                      "store every worker reads, e.g. s3://bucket/comat): pass it in the run's parameters, "
                      "e.g. --params '{\"config\": {\"storage\": \"s3://bucket/comat\"}}', or set it in "
                      "the deployment's parameters")


def refuse(error: ComatError) -> State:
    """A run refused at its start: the CLI's one line as the run's state and log, no traceback.

    The state carries the error, so an in-process caller (``comat run``) gets it raised again."""
    log.error("comat: error: %s", error)
    return Failed(message=f"comat: error: {error}", data=error)


def publish_run_summary(cfg: ComatConfig, results: dict[str, str], started: float, failed=None) -> None:
    """The parent run's summary artifact (``tasks/summary.py``); its lines go to the run's log too."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.artifacts import artifact_key, pipeline_scope
    from tasks.summary import closing_lines, headline_rows, stage_rows, summary_markdown

    try:
        store = open_store(cfg)
        rows = stage_rows(cfg, store, results, started, failed)
        closing = closing_lines(cfg, store, results) if not failed else []
        text = summary_markdown(cfg, store, rows, headline_rows(store, results), closing, started)
        create_markdown_artifact(text, key=artifact_key(pipeline_scope(cfg.preset, store.root_url), "run", "summary"),
                                 description=f"{cfg.preset}: what each stage did, the evaluation, where the outputs are")
        for r in rows:
            log.info("%-16s %-8s %s %s", r["stage"], r["state"], r["key"], r["url"])
    except Exception as e:  # noqa: BLE001 - a summary must never fail the run it describes
        log.warning("could not publish the run summary: %s: %s", type(e).__name__, e)


if __name__ == "__main__":
    print(comat())
