"""``comat deploy``: register deployments/prefect.yaml with the Prefect server in ``PREFECT_API_URL``.

    deploy()                         every deployment, on the `cpu` and `gpu` pools (which must exist)
    deploy(["full-pipeline"])        only these (a name or ``flow/name``, e.g. ``comat-train/gpu``)
    deploy(local=True)               the local profile: the same deployments, all on one `process`
                                     pool named `local` (created if missing), running the code of this
                                     checkout, so one `prefect worker start --pool local` runs everything

Both run ``prefect --no-prompt deploy`` from the repository root (entrypoints are relative to it).

GPU stages: every stage task that needs a GPU carries the tag ``gpu``; ``deploy(local=True)`` sets
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

    Job variables for images and GPUs are dropped (a process pool runs the code in place); schedules
    are kept as they are (the retraining schedule stays paused).
    """
    out = copy.deepcopy(spec)
    out.pop("definitions", None)
    out["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
    for d in out.get("deployments", []):
        d["work_pool"] = {"name": pool, "job_variables": {"labels": {"comat.io/pool": pool}}}
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
        env = {**os.environ, "DO_NOT_TRACK": os.environ.get("DO_NOT_TRACK", "1")}
        rc = subprocess.run(deploy_command(prefect_file, names), cwd=REPO, env=env).returncode
    if rc == 0 and not names:
        from flows.automations import apply_automations

        apply_automations(notify)
    return rc
