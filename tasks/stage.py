"""One thin Prefect task per stage: build the config, check the inputs, ``run_stage``, publish, return the URL.

Caching
-------
The artifact store's manifest *is* the cache, and Prefect's own result cache is off
(``cache_policy=NO_CACHE``). Reasons:

* ``comat_core.stages.registry.run_stage`` already returns the existing output when the stage's
  ``_manifest.json`` exists under its stage key, and the stage key hashes the stage's config
  section, its models, its code version and its inputs' content (their files' sha256). That is exactly
  "cache keyed on the stage key, honoured only when the manifest exists": a wiped bucket or a deleted
  stage folder has no manifest, so the stage recomputes instead of failing on a stale Prefect record.
* A second cache (Prefect result records) could disagree with storage. The task's result is only
  the stage URL, which is recomputed from the key in milliseconds.
* ``comat run`` (in-process) and deployments on remote workers then mean the same thing by "cached".

Results are still *persisted* when the store is local or S3 and the stage computes: ``run_stage_task``
writes them as JSON to ``<storage root>/_prefect-results/`` through a block without credentials
(``tasks/results.py``). A cache hit writes nothing into the store.

Fan-out parts: ``part=[k, n]`` computes only the k-th of n slices of a sharded stage's shards and
does not commit the stage (see ``comat_core/store/shards.py``); its run is named ``<stage>-<key> part k+1/n``.

A hit still shows in the UI: the task returns a ``Completed`` state named ``Cached``, and its run
is named ``<stage>-<key>``. ``force`` wipes the stage's folder first (``run_stage(force=True)``);
everything downstream gets new keys when the new output's bytes differ, and stays cached when they do not.

Retries
-------
Transient failures (``StorageError`` except ``IntegrityError``, ``OSError`` except missing files and
denied permissions, connection and timeout errors, including botocore/aiohttp ones) are retried with
exponential backoff. ``ConfigError`` and
``InputError`` (and anything else, e.g. a bug) are not: retrying cannot fix them. A missing input
stage is reported as ``InputError`` (run that stage first), not as a storage failure.

Test hook
---------
``COMAT_TEST_FAIL_AT_SHARD`` (tests only) = ``N`` or ``<stage>:N`` passes
``hooks={"fail_at_shard": N}`` to the stage, on the first attempt of the flow run and task run
only, so a flow retry then runs the same stage without it and must resume from committed shards.
"""

from __future__ import annotations

import os
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from comat_core.config import ComatConfig, build_config
from comat_core.errors import InputError, IntegrityError, StorageError
from comat_core.stages.registry import STAGES, compute_key, missing_input_advice, run_stage, stage_inputs
from comat_core.store.shards import ShardPart
from comat_core.store.storage import ArtifactStore
from tasks.results import persisting


RETRIES = 3
GPU_TIMEOUT_ENV = "COMAT_GPU_STAGE_TIMEOUT_HOURS"  # a GPU stage running longer fails (0: no limit)
GPU_TIMEOUT_HOURS = 48.0
RETRY_DELAYS = exponential_backoff(backoff_factor=10)  # 10 s, 20 s, 40 s
FAIL_AT_SHARD_ENV = "COMAT_TEST_FAIL_AT_SHARD"
_TRANSIENT_NAMES = ("Connection", "Timeout", "Throttl", "SlowDown", "ServiceUnavailable", "EndpointConnection")


def config_payload(cfg: ComatConfig) -> dict:
    """A config request that rebuilds exactly ``cfg`` anywhere (no config file to find on a worker)."""
    return {"preset": cfg.preset, "storage": cfg.storage.root, "values": cfg.model_dump(mode="json", exclude={"preset"})}


def open_store(cfg: ComatConfig) -> ArtifactStore:
    return ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout)


# ---------------------------------------------------------------- retries

def is_transient(exc: BaseException) -> bool:
    """Worth retrying: storage and network trouble, not configuration, input or integrity errors,
    nor a stage that ran past its time limit (it would hang again)."""
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(exc, TaskRunTimeoutError):
        return False
    if isinstance(exc, (IntegrityError, PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return False  # a retry finds the same file, the same permissions
    if isinstance(exc, (StorageError, OSError, ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "httpx") and any(
        n in cls.__name__ for cls in type(exc).__mro__ for n in _TRANSIENT_NAMES)


def retry_on_transient(task, task_run, state: State) -> bool:
    """``retry_condition_fn``: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classify whatever the stage raised
        return is_transient(exc)
    return False


# ---------------------------------------------------------------- naming and inputs

def upstream(cfg: ComatConfig, stage: str) -> list[str]:
    """Every stage ``stage`` reads, directly or through its inputs, in pipeline order."""
    needed: set[str] = set()
    todo = list(stage_inputs(cfg, stage))
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(stage_inputs(cfg, name))
    return [s for s in cfg.stage_order() if s in needed]


def check_inputs(cfg: ComatConfig, store: ArtifactStore, stage: str) -> None:
    """Raise ``InputError`` (not retried) naming the first upstream stage with no complete output."""
    for name in upstream(cfg, stage):
        key = compute_key(cfg, store, name)
        if store.read_manifest(name, key) is None:
            deployment = f"comat-{name.replace('_', '-')}/{'gpu' if STAGES[name].gpu else 'cpu'}"
            advice = missing_input_advice(cfg, store, name, f"run {name} first: the deployment {deployment} "
                                                            f"(prefect deployment run {deployment}) or comat run "
                                                            f"--stages {name}")
            raise InputError(f"stage {stage} needs {name}, which has no complete output at "
                             f"{store.stage_url(name, key)}; {advice}")


def task_run_name(parameters: dict) -> str:
    """``<stage>-<stage key>`` (``<stage>-waiting`` when the key cannot be computed yet), plus the part."""
    stage = parameters.get("stage", "stage")
    try:
        part = ShardPart.parse(parameters.get("part"))
    except Exception:  # noqa: BLE001
        part = None
    suffix = f" part {part}" if part else ""
    try:
        cfg = build_config(parameters.get("config"))
        return f"{stage}-{compute_key(cfg, open_store(cfg), stage)}{suffix}"
    except Exception:  # noqa: BLE001 - a name must never fail the run; the task reports the error
        return f"{stage}-waiting{suffix}"


def test_hooks(stage: str) -> dict:
    """Hooks from ``COMAT_TEST_FAIL_AT_SHARD`` for this stage, on first attempts only (tests only)."""
    value = os.environ.get(FAIL_AT_SHARD_ENV, "").strip()
    if not value:
        return {}
    target, _, shard = value.rpartition(":")
    if target and target != stage:
        return {}
    from prefect.runtime import flow_run, task_run

    if (flow_run.run_count or 1) > 1 or (task_run.run_count or 1) > 1:
        return {}
    return {"fail_at_shard": int(shard)}


# ---------------------------------------------------------------- the task

@task(
    name="comat-stage",
    task_run_name=task_run_name,
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
)
def stage_task(stage: str, config: dict, force: bool = False, part: list[int] | None = None,
               staged: str | None = None) -> State:
    """Run one stage through ``comat_core.stages.registry.run_stage``; the state's data is the stage URL.

    ``part=[k, n]``: only the k-th of n slices of a sharded stage's shards, stage not committed.
    ``staged``: a forced fan-out's staging folder (``run_stage(staged=...)``): written there, promoted at commit."""
    from prefect.runtime import flow_run

    from tasks.artifacts import ProgressReporter, pipeline_scope, publish_stage
    from tasks.events import checkpoint_hook, stage_completed
    from tasks.logs import forward_to_runs, quiet_libraries

    forward_to_runs()
    quiet_libraries()
    cfg = build_config(config)
    shard_part = ShardPart.parse(part)
    store = open_store(cfg)
    check_inputs(cfg, store, stage)
    key = compute_key(cfg, store, stage)
    scope = pipeline_scope(cfg.preset, store.root_url)
    progress = ProgressReporter(stage, key, scope)
    if force or staged or store.read_manifest(stage, key) is None:
        progress.start()  # a cache hit gets one note below, no progress bar
    t0 = time.time()
    try:
        hooks = test_hooks(stage) | ({"on_checkpoint": checkpoint_hook(cfg, key)} if stage == "train" else {})
        result = run_stage(cfg, store, stage, force=force, progress=progress.update, hooks=hooks,
                           shard_part=shard_part, staged=staged)
    except BaseException as e:  # a cancel or a kill too: the progress artifact says how the stage ended
        progress.fail(e)
        raise
    seconds = time.time() - t0
    progress.finish(result.cached)
    if result.partial:
        done = result.manifest["summary"]
        return Completed(message=f"{stage} {result.key}: part {shard_part}, {done['shards_generated']} of "
                                 f"{len(done['shards'])} shards computed in {seconds:.1f} s", data=result.url)
    publish_stage(store, result, seconds, scope)
    stage_completed(cfg, result, seconds, config, flow_run.flow_name or "", evaluation_figures(store, result))
    if result.cached:
        return Completed(name="Cached", message=f"{stage} {result.key}: manifest exists in storage", data=result.url)
    return Completed(message=f"{stage} {result.key}: computed in {seconds:.1f} s", data=result.url)


def gpu_timeout_seconds() -> float | None:
    """``COMAT_GPU_STAGE_TIMEOUT_HOURS`` (default 48; 0 turns it off): a hung GPU job does not hold its GPU forever."""
    hours = float(os.environ.get(GPU_TIMEOUT_ENV, GPU_TIMEOUT_HOURS))
    return hours * 3600 if hours > 0 else None


# The tag ``gpu`` is what the GPU concurrency limit counts (``flows/deploy.py``: ``comat deploy --local``).
STAGE_TASKS = {name: stage_task.with_options(name=f"comat-{name}".replace("_", "-"),
                                             tags=["comat", "gpu" if spec.gpu else "cpu"],
                                             timeout_seconds=gpu_timeout_seconds() if spec.gpu else None)
               for name, spec in STAGES.items()}


def evaluation_figures(store: ArtifactStore, result) -> dict | None:
    """evaluate: the headline metric per category (base, tuned, delta, 95 % CI) for its event."""
    if result.stage != "evaluate":
        return None
    from tasks.summary import headline_rows

    try:
        rows = headline_rows(store, {"evaluate": result.url})
    except Exception:  # noqa: BLE001 - an event's figures are best effort
        return None
    return {r["category"]: {k: r[k] for k in ("metric", "base", "tuned", "delta", "ci95_low", "ci95_high")} for r in rows}


def _complete(cfg: ComatConfig, stage: str, force: bool, part, staged: str | None = None) -> bool:
    """The stage is complete in storage and will be a cache hit: its task result is not persisted
    (a hit writes nothing into the store; the manifest already says everything)."""
    if force or part is not None or staged:
        return False
    try:
        store = open_store(cfg)
        return store.read_manifest(stage, compute_key(cfg, store, stage)) is not None
    except Exception:  # noqa: BLE001 - inputs missing or storage trouble: the task reports it
        return False


def run_stage_task(stage: str, cfg: ComatConfig, force: bool = False, part: list[int] | None = None,
                   staged: str | None = None) -> str:
    """Call the stage's task inside a flow and return its URL (raises if the task failed).

    The result of a stage that computes is persisted on the artifact store when it is local or S3
    (``tasks/results.py``); a cache hit's is not, and a cache hit runs without the ``gpu`` tag, so the
    GPU concurrency limit never makes an all-cached run wait behind a training."""
    if _complete(cfg, stage, force, part, staged):  # a cache hit reads a manifest: it must not wait for a GPU slot
        task = STAGE_TASKS[stage].with_options(tags=[t for t in STAGE_TASKS[stage].tags if t != "gpu"] + ["cached"])
    else:
        task = persisting(STAGE_TASKS[stage], cfg)
        if "gpu" in task.tags:  # a slot a killed run on this host still holds is freed now, not in a minute
            from tasks.slots import free_dead_slots

            free_dead_slots("gpu")
    parameters = {"stage": stage, "config": config_payload(cfg), "force": force}
    if part is not None:
        parameters["part"] = list(part)
    if staged:
        parameters["staged"] = staged
    return task(**parameters, return_state=True).result()
