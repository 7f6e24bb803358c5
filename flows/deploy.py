"""``comat deploy``: register deployments/prefect.yaml with the Prefect server in ``PREFECT_API_URL``.

    deploy()                         every deployment, on the `cpu` and `gpu` pools (which must exist)
    deploy(["full-pipeline"])        only these (a name or ``flow/name``, e.g. ``comat-train/gpu``)
    deploy(local=True)               the local profile: the same deployments, all on one `process`
                                     pool named `local` (created if missing), running the code of this
                                     checkout, so one `prefect worker start --pool local` runs everything

Both run ``prefect --no-prompt deploy`` from the repository root (entrypoints are relative to it),
then ``reconcile``: a schedule already registered keeps its active or paused state, parameters set
in the UI that prefect.yaml does not set are kept, the run forms require ``config.storage`` (and
show ``parallelism`` only where it is accepted), and every change is printed.

GPU stages: every stage task that needs a GPU and computes carries the tag ``gpu`` (a cache hit
does not: it reads a manifest, and must not wait for a GPU slot); ``deploy(local=True)`` sets
a concurrency limit on that tag of the machine's GPU count (``gpus``; at least 1, so a CPU-only box
runs one heavy stage at a time), so one worker never runs two GPU stages at once, whether they are
tasks of one pipeline run, stages of two runs, or fan-out parts. The limit holds server-wide: on
a cluster give it the number of GPUs the ``gpu`` pool can run at once
(``prefect concurrency-limit create gpu N``).
The local profile is derived from prefect.yaml (a temporary copy with the pools and the pull step
replaced) so there is one list of deployments to maintain.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from comat_core.errors import ConfigError, StorageError

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
LOCAL_POOL = "local"
POOL_HINTS = {
    "cpu": "prefect work-pool create cpu --type process",
    "gpu": "prefect work-pool create gpu --type kubernetes --base-job-template infra/k8s/gpu-job-template.json "
           "(or --type process on a GPU machine)",
}


def load_spec(path: Path = PREFECT_FILE) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def local_profile(spec: dict, repo: Path = REPO, pool: str = LOCAL_POOL) -> dict:
    """prefect.yaml with every deployment on ``pool`` and the flow runs' working directory at ``repo``.

    Job variables for images and GPUs are dropped (a process pool runs the code in place); the tag
    naming a deployment's pool becomes ``pool`` (no ``gpu`` tag on a deployment that runs on
    ``local``); schedules are as in the file (``deploy`` keeps a registered schedule's state).
    """
    out = copy.deepcopy(spec)
    out.pop("definitions", None)
    out["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
    pools = pools_of(spec)
    for d in out.get("deployments", []):
        d["work_pool"] = {"name": pool, "job_variables": {"labels": {"comat.io/pool": pool}}}
        d["tags"] = [t for t in d.get("tags", []) if t not in pools] + [pool]
    return out


def pools_of(spec: dict) -> set[str]:
    return {d["work_pool"]["name"] for d in spec.get("deployments", []) if d.get("work_pool")}


def api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError("PREFECT_API_URL is not set; start a server (prefect server start) and "
                          "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def ensure_pools(names: set[str], create: bool) -> None:
    """Create missing ``process`` pools (local profile) or name the command that creates them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            except Exception as e:  # noqa: BLE001 - any failure here means the server is unreachable
                raise StorageError(f"Prefect server {api_url()} is not reachable: {type(e).__name__}: {e}") from None
            if not create:
                raise ConfigError(f"work pool {name!r} does not exist; create it first: "
                                  f"{POOL_HINTS.get(name, f'prefect work-pool create {name} --type process')}")
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created work pool {name!r} (process)")


def deploy_command(prefect_file: Path, names: list[str] | None) -> list[str]:
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    if names:
        for n in names:
            cmd += ["--name", n]
    else:
        cmd.append("--all")
    return cmd


GPU_TAG = "gpu"


def gpu_count() -> int:
    """GPUs this process can see (``CUDA_VISIBLE_DEVICES`` applies), at least 1."""
    import torch

    return max(1, torch.cuda.device_count())


def ensure_gpu_limit(count: int) -> None:
    """At most ``count`` task runs tagged ``gpu`` at once, server-wide (created or updated)."""
    from prefect.client.orchestration import get_client

    if count < 1:
        raise ConfigError(f"--gpus must be at least 1, not {count}")
    try:
        with get_client(sync_client=True) as client:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=count)
    except Exception as e:  # noqa: BLE001 - any failure here means the server is unreachable
        raise StorageError(f"Prefect server {api_url()} is not reachable: {type(e).__name__}: {e}") from None
    print(f"GPU stages: at most {count} at once (concurrency limit on the task tag {GPU_TAG!r}; "
          f"change it with: prefect concurrency-limit create {GPU_TAG} N)")


def deploy(names: list[str] | None = None, local: bool = False, prefect_file: Path = PREFECT_FILE,
           gpus: int | None = None, notify: str | None = None) -> int:
    """Register the deployments, then the automations (``flows/automations.py``) when every deployment
    was deployed; returns the exit status of ``prefect deploy``."""
    api_url()
    if local or gpus is not None:
        ensure_gpu_limit(gpus if gpus is not None else gpu_count())
    spec = load_spec(prefect_file)
    with tempfile.TemporaryDirectory(prefix="comat-deploy-") as tmp:
        if local:
            spec = local_profile(spec)
            prefect_file = Path(tmp) / "prefect.local.yaml"
            prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        ensure_pools(pools_of(spec), create=local)
        before = registered(spec, names)
        env = {**os.environ, "DO_NOT_TRACK": os.environ.get("DO_NOT_TRACK", "1")}
        rc = subprocess.run(deploy_command(prefect_file, names), cwd=REPO, env=env).returncode
    if rc == 0:
        for line in reconcile(spec, before, names):
            print(line)
    if rc == 0 and not names:
        from flows.automations import apply_automations

        apply_automations(notify)
    return rc


# ---------------------------------------------------------------- what a redeploy keeps

def deployment_names(spec: dict, names: list[str] | None = None) -> dict[str, dict]:
    """``{"<flow name>/<deployment name>": deployment spec}`` for the deployments in prefect.yaml
    (only those ``names`` selects, as ``prefect deploy --name`` does: a name or ``flow/name``)."""
    import importlib

    out = {}
    for d in spec.get("deployments", []):
        module, _, fn = d["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), fn)
        full = f"{flow.name}/{d['name']}"
        if not names or full in names or d["name"] in names:
            out[full] = d
    return out


def registered(spec: dict, names: list[str] | None = None) -> dict[str, object]:
    """The deployments of ``spec`` as the server has them now (before ``prefect deploy`` replaces them)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    out = {}
    with get_client(sync_client=True) as client:
        for name in deployment_names(spec, names):
            try:
                out[name] = client.read_deployment_by_name(name)
            except ObjectNotFound:
                pass
    return out


def merge_kept(old, new):
    """``new`` with what only ``old`` has added (keys ``new`` does not set, at any depth): a value set
    in the UI and absent from prefect.yaml survives a redeploy; one prefect.yaml sets is replaced."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out = dict(new)
    for k, v in old.items():
        out[k] = merge_kept(v, new[k]) if k in new else v
    return out


def changes(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two parameter dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def form_schema(schema: dict, spec: dict) -> dict:
    """The run form of a deployment: ``config.storage`` required (a deployment run without it is
    refused), ``config.values`` (what the pipeline passes to the stage runs it starts) hidden on the
    deployments people start, and ``parallelism`` only where the deployment dispatches to workers."""
    out = copy.deepcopy(schema)
    request = out.get("definitions", {}).get("ConfigRequest")
    props = out.get("properties", {})
    if request:
        request["properties"]["storage"] = {
            "type": "string", "minLength": 1, "title": "Storage",
            "description": "artifact store root every worker reads, e.g. s3://bucket/comat (required)"}
        request["required"] = sorted(set(request.get("required", [])) | {"storage"})
        if spec["entrypoint"].endswith("pipeline.py:comat"):
            request["properties"].pop("values", None)
        if "config" in props:
            out["required"] = sorted(set(out.get("required", [])) | {"config"})
    if "parallelism" in props and "parallelism" not in (spec.get("parameters") or {}):
        props.pop("parallelism")
    return out


def reconcile(spec: dict, before: dict[str, object], names: list[str] | None = None) -> list[str]:
    """After ``prefect deploy``: put back each schedule's active state and the parameters set in the
    UI that prefect.yaml does not set, fit the run forms (``form_schema``); say what changed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    lines = []
    with get_client(sync_client=True) as client:
        for name, d in deployment_names(spec, names).items():
            now = client.read_deployment_by_name(name)
            old = before.get(name)
            update = {"parameter_openapi_schema": form_schema(now.parameter_openapi_schema or {}, d)}
            if old is None:
                lines.append(f"{name}: created")
            else:
                kept = merge_kept(old.parameters or {}, now.parameters or {})
                if kept != (now.parameters or {}):
                    update["parameters"] = kept
                    lines.append(f"{name}: kept parameters set in the UI: {', '.join(changes(now.parameters or {}, kept))}")
                replaced = changes(old.parameters or {}, kept)
                if replaced:
                    lines.append(f"{name}: parameters from prefect.yaml replace {', '.join(replaced)}")
                for field in ("description", "tags", "work_pool_name", "entrypoint"):
                    if getattr(old, field) != getattr(now, field):
                        lines.append(f"{name}: {field} {getattr(old, field)!r} -> {getattr(now, field)!r}")
                lines += restore_schedules(client, name, old, now)
            client.update_deployment(now.id, DeploymentUpdate(**update))
    return lines or ["deployments unchanged"]


def restore_schedules(client, name: str, old, now) -> list[str]:
    """A schedule that was registered keeps its active or paused state (matched by its schedule)."""
    lines = []
    states = {json_of(s.schedule): s.active for s in old.schedules or []}
    for s in now.schedules or []:
        was = states.get(json_of(s.schedule))
        if was is None:
            lines.append(f"{name}: new schedule {describe_schedule(s.schedule)} ({'active' if s.active else 'paused'})")
        elif was != s.active:
            client.update_deployment_schedule(now.id, s.id, active=was)
            lines.append(f"{name}: schedule {describe_schedule(s.schedule)} kept {'active' if was else 'paused'} "
                         f"(prefect.yaml says {'active' if s.active else 'paused'})")
    return lines


def json_of(schedule) -> str:
    return schedule.model_dump_json()


def describe_schedule(schedule) -> str:
    return getattr(schedule, "cron", None) or type(schedule).__name__
