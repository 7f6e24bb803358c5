"""End to end: deployments/prefect.yaml (local profile) → a Prefect server → a process worker →
``prefect deployment run comat/full-pipeline`` on the tiny preset with S3 storage (moto).

Asserts the run completes, every stage's manifest is in the bucket, and each stage's UI artifacts
exist (read back through the Prefect client). The worker is started here and stopped after.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from comat_core.config import load_config
from comat_core.stages.registry import compute_key
from comat_core.store.storage import ArtifactStore
from services import services, stop_pid  # noqa: F401 - the session fixture
from test_orchestration import FAST, RUNNABLE

pytestmark = pytest.mark.slow
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture
def e2e_env(services, tmp_path, monkeypatch):
    """Variables for the deploy, the worker and its flow runs: the services, S3 endpoint, one thread.

    Afterwards, the ``gpu`` tag limit that ``comat deploy --local`` creates is removed from the shared
    server: a later test's GPU stage must not queue behind it (a killed run's slot is held until
    Prefect lets it go, about a minute)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", services["COMAT_TEST_S3_ENDPOINT"])
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    yield env
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import GPU_TAG

    with get_client(sync_client=True) as client:
        try:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            pass


@pytest.fixture
def worker(e2e_env, tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(PREFECT + ["worker", "start", "--pool", "local", "--type", "process", "--limit", "2"],
                                env=e2e_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    yield proc, log
    stop_pid(proc.pid)


def _wait_final(flow_run_id: str, timeout: float):
    from prefect import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final() or time.time() > deadline:
                return run
            time.sleep(2)


def _artifact_keys(flow_run_id) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key for a in arts if a.key}


def test_full_pipeline_deployment_runs_on_a_local_worker_with_s3(services, e2e_env, worker, monkeypatch):
    from flows.deploy import deploy

    monkeypatch.setenv("PREFECT_HOME", e2e_env["PREFECT_HOME"])
    assert deploy(local=True) == 0

    from prefect import get_client

    with get_client(sync_client=True) as client:
        full = client.read_deployment_by_name("comat/full-pipeline")
        retrain = client.read_deployment_by_name("comat/scheduled-retraining")
        stage_deployments = [client.read_deployment_by_name(n) for n in
                             ("comat-prompts/cpu", "comat-gan-gt/gpu", "comat-masks/gpu", "comat-train/gpu",
                              "comat-evaluate/gpu", "comat-sdxl-prefinetune/gpu")]
    assert full.work_pool_name == "local"
    assert all(d.work_pool_name == "local" for d in stage_deployments)
    assert retrain.schedules and not any(s.active for s in retrain.schedules)

    root = f"s3://{services['COMAT_TEST_S3_BUCKET']}/e2e-{uuid.uuid4().hex[:8]}"
    params = {"config": {"preset": "tiny", "storage": root, "overrides": FAST}}  # all stages (default)
    flow_run_id = _deployment_run("comat/full-pipeline", params, e2e_env)

    proc, log = worker
    run = _wait_final(flow_run_id, timeout=420)
    assert run.state.is_completed(), f"{run.state}\n--- worker log ---\n{Path(log).read_text()[-4000:]}"
    from flows._naming import describe

    assert run.name == describe(params["config"], None) and run.name.endswith(": " + " > ".join(RUNNABLE))

    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": root}})
    store = ArtifactStore(cfg.storage.root)
    for stage in RUNNABLE:
        key = compute_key(cfg, store, stage)
        assert store.read_manifest(stage, key) is not None, f"{stage} has no manifest in {root}"

    keys = _artifact_keys(run.id)
    from tasks.artifacts import artifact_key, pipeline_scope

    scope = pipeline_scope("tiny", store.root_url)
    for stage in RUNNABLE:
        for kind in ("progress", "outputs", "storage"):
            assert artifact_key(scope, stage, kind) in keys, (stage, kind, sorted(keys))
    assert artifact_key(scope, "run", "summary") in keys

    # Fan-out: the last stage, forced, as a flow run of its own deployment under the parent.
    last = RUNNABLE[-1]
    before = store.read_manifest(last, compute_key(cfg, store, last))
    params = {"config": params["config"], "stages": [last], "force": [last]}
    parent_id = _deployment_run("comat/full-pipeline-fanout", params, e2e_env)
    parent = _wait_final(parent_id, timeout=300)
    assert parent.state.is_completed(), f"{parent.state}\n--- worker log ---\n{Path(log).read_text()[-4000:]}"
    children = _child_runs(parent.id)
    assert [c.name for c in children] == [describe(params["config"], [last], [last])] and children[0].state.is_completed()
    after = store.read_manifest(last, compute_key(cfg, store, last))
    assert after["finished_at"] > before["finished_at"]

    # The README's way to enable the retraining schedule.
    out = subprocess.run(PREFECT + ["deployment", "schedule", "resume", "comat/scheduled-retraining",
                                    str(retrain.schedules[0].id)], env=e2e_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("comat/scheduled-retraining").schedules[0].active


def _deployment_run(name: str, params: dict, env: dict) -> str:
    """``prefect deployment run NAME --params JSON``; returns the new flow run's id."""
    out = subprocess.run(PREFECT + ["deployment", "run", name, "--params", json.dumps(params)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout).group(1)


def _child_runs(parent_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def test_deployment_runs_fail_in_one_line_and_deploy_keeps_schedules(services, e2e_env, worker, monkeypatch, capsys):
    """On a real worker: a config error and a stage failure leave one line and no traceback in the run's
    logs; a run without storage is refused at submission; a redeploy keeps a schedule's state and the
    parameters set in the UI that prefect.yaml does not set, and says so."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from flows.deploy import deploy
    from test_orchestration import run_logs

    monkeypatch.setenv("PREFECT_HOME", e2e_env["PREFECT_HOME"])
    assert deploy(local=True) == 0
    capsys.readouterr()  # created here, or already registered by another test on this server

    out = subprocess.run(PREFECT + ["deployment", "run", "comat/full-pipeline", "--params",
                                    json.dumps({"config": {"preset": "tiny"}})], env=e2e_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "storage" in out.stdout + out.stderr, out.stdout + out.stderr

    root = f"s3://{services['COMAT_TEST_S3_BUCKET']}/e2e-{uuid.uuid4().hex[:8]}"
    bad = _deployment_run("comat/full-pipeline", {"config": {"preset": "tiny", "storage": root,
                                                             "overrides": FAST + ["train.max_stpes=3"]}}, e2e_env)
    missing = _deployment_run("comat-evaluate/gpu", {"config": {"preset": "tiny", "storage": root, "overrides": FAST}},
                              e2e_env)
    proc, log = worker
    for run_id, needle in ((bad, "max_stpes"), (missing, "needs prompts")):
        run = _wait_final(run_id, timeout=300)
        assert run.state.is_failed(), f"{run.state}\n--- worker log ---\n{Path(log).read_text()[-4000:]}"
        assert needle in run.state.message and "\n" not in run.state.message, run.state.message
        logs = run_logs(run.id, "Finished in state Failed")
        time.sleep(3)  # the engine's last lines arrive in the next batch
        logs = run_logs(run.id, "Finished in state Failed")
        assert any(needle in m for m in logs) and not any("Traceback" in m for m in logs), logs
        if needle == "max_stpes":
            assert run.name.startswith("tiny: refused, config not valid"), run.name

    name = "comat/scheduled-retraining"
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name(name)
        client.update_deployment_schedule(retrain.id, retrain.schedules[0].id, active=True)
        params = retrain.parameters
        params["config"]["overrides"] = ["train.max_steps=5"]  # a UI edit of a value prefect.yaml leaves out
        client.update_deployment(retrain.id, DeploymentUpdate(parameters=params))
    assert deploy(local=True, names=["scheduled-retraining"]) == 0
    printed = capsys.readouterr().out
    assert "kept active" in printed and "config.overrides" in printed, printed
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name(name)
        assert retrain.schedules[0].active and retrain.parameters["config"]["overrides"] == ["train.max_steps=5"]
        client.update_deployment_schedule(retrain.id, retrain.schedules[0].id, active=False)
    assert deploy(local=True, names=["scheduled-retraining"]) == 0
    with get_client(sync_client=True) as client:
        assert not client.read_deployment_by_name(name).schedules[0].active  # paused stays paused
