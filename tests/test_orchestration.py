"""Orchestration against a real Prefect server: stage caching, force, config changes, deleted folders,
single-stage flows, retries, resuming a crashed sharded stage, UI artifacts.

The server (and moto, unused here) come from ``tests/services.py``. Flows run in this process with
``PREFECT_API_URL`` pointing at the server; storage is a local folder per test, copied from one
baseline run of the tiny preset (smallest settings) so each test pays only for what it recomputes.
"""

from __future__ import annotations

import json
import re
import typing
import shutil
import time
from pathlib import Path

import pytest

from services import services  # noqa: F401 - the session fixture
from fast_run import FAST
from comat_core.config import load_config
from comat_core.errors import ConfigError, InputError, IntegrityError, StorageError
from comat_core.stages.registry import compute_key, downstream
from comat_core.store.storage import ArtifactStore
from flows._naming import describe

BASE_CFG = load_config("tiny", overrides=FAST)
RUNNABLE = BASE_CFG.stage_order()  # prompts > gan_gt > masks > train > evaluate


# ---------------------------------------------------------------- fixtures and helpers

def request(root: Path, *overrides: str) -> dict:
    return {"preset": "tiny", "storage": str(root), "overrides": FAST + list(overrides)}


def manifests(root: Path, *overrides: str) -> dict[str, dict]:
    """{stage: manifest} for every runnable stage complete under this config."""
    cfg = load_config("tiny", overrides=FAST + list(overrides), extra={"storage": {"root": str(root)}})
    store = ArtifactStore(cfg.storage.root)
    out = {}
    for s in RUNNABLE:
        m = store.read_manifest(s, compute_key(cfg, store, s))
        if m is None:
            break
        out[s] = m
    return out


def run_pipeline(root: Path, *overrides: str, **kwargs):
    """Run the parent flow; returns (results, flow_run_id)."""
    from flows.pipeline import comat

    state = comat(config=request(root, *overrides), stages=RUNNABLE, return_state=True, **kwargs)
    return state.result(), state.state_details.flow_run_id


def task_runs(flow_run_id, expected: int, timeout: float = 30) -> dict[str, object]:
    """The flow run's task runs by stage (task-run events reach the server asynchronously: poll)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        final = [r for r in runs if r.state and r.state.is_final()]
        if len(final) >= expected or time.time() > deadline:
            return {r.name.rsplit("-", 1)[0]: r for r in final}
        time.sleep(0.5)


def run_logs(flow_run_id, expect: str, timeout: float = 30) -> list[str]:
    """The flow run's log messages, oldest first, once one contains ``expect`` (logs arrive in batches)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200)
        messages = [entry.message for entry in logs]
        if any(expect in m for m in messages) or time.time() > deadline:
            return messages


def state_names(flow_run_id, stages: list[str]) -> dict[str, str]:
    return {s: r.state.name for s, r in task_runs(flow_run_id, len(stages)).items()}


def recomputed(before: dict[str, dict], after: dict[str, dict]) -> set[str]:
    """Stages whose manifest is new (different key or a later finished_at)."""
    return {s for s in after if s not in before or after[s]["key"] != before[s]["key"]
            or after[s]["finished_at"] != before[s]["finished_at"]}


@pytest.fixture(scope="module")
def baseline(services, tmp_path_factory):
    """One full run of the runnable stages into a fresh store (the other tests copy it)."""
    root = tmp_path_factory.mktemp("baseline") / "store"
    results, flow_run_id = run_pipeline(root)
    return {"root": root, "results": results, "flow_run_id": flow_run_id,
            "manifests": manifests(root)}


@pytest.fixture
def store_copy(baseline, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(baseline["root"], dst)
    return dst


# ---------------------------------------------------------------- the parent flow

def test_first_run_computes_every_stage_and_names_runs(baseline):
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(baseline["root"])}})
    store = ArtifactStore(cfg.storage.root)
    assert list(baseline["results"]) == RUNNABLE
    for stage, url in baseline["results"].items():
        key = compute_key(cfg, store, stage)
        assert url == store.stage_url(stage, key)
        assert baseline["manifests"][stage]["key"] == key
    runs = task_runs(baseline["flow_run_id"], len(RUNNABLE))
    assert sorted(runs) == sorted(RUNNABLE)
    for stage, run in runs.items():
        assert run.name == f"{stage}-{baseline['manifests'][stage]['key']}"
        assert run.state.name == "Completed"

    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(baseline["flow_run_id"])
    assert flow_run.name == describe(request(baseline["root"]), RUNNABLE)
    assert re.fullmatch(r"tiny [0-9a-f]{6}@[0-9a-f]{6}: " + " > ".join(RUNNABLE), flow_run.name), flow_run.name


def test_run_names_tell_pipelines_apart(tmp_path):
    """Preset, a hash of everything set, a hash of the storage root: same request, same name."""
    name = describe(request(tmp_path / "a"), None)
    assert describe(request(tmp_path / "a"), None) == name
    other_store, other_config = describe(request(tmp_path / "b"), None), describe(request(tmp_path / "a", "train.max_steps=3"), None)
    assert len({name, other_store, other_config}) == 3
    assert name.split("@")[1] == other_config.split("@")[1]  # same storage, same storage hash
    assert name.split("@")[0] != other_config.split("@")[0] and name.split("@")[0].startswith("tiny ")


def test_stage_lines_reach_the_flow_runs_logs(baseline):
    """Not only state changes: what each stage did, in a few readable lines per stage."""
    text = "\n".join(run_logs(baseline["flow_run_id"], "evaluate: computed in"))
    keys = {s: m["key"] for s, m in baseline["manifests"].items()}
    for stage in RUNNABLE:
        assert f"{stage}: computing {baseline['results'][stage]}" in text, stage
        assert f"{stage}: computed in" in text, stage
    assert "gan_gt: 2 of 2 shards to compute" in text and "masks: 2 of 2 shards to compute" in text
    assert "step 2/2: loss " in text and " | grad " in text and "D loss" in text  # a readable line, not a dict
    assert "gan_gt: 4/4" in text  # progress, in tenths
    assert "{'" not in text, text  # no dicts dumped
    assert len(text.splitlines()) < 120, len(text.splitlines())
    assert keys["train"] in text


def all_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_second_run_is_all_cache_hits(baseline):
    before = all_files(baseline["root"])
    results, flow_run_id = run_pipeline(baseline["root"])
    assert all_files(baseline["root"]) == before  # a run of cache hits writes nothing into the store
    arts = flow_run_artifacts(flow_run_id)
    notes = sorted(a.key for a in arts if a.key.endswith("-outputs"))
    assert notes == sorted(key_of(baseline, s, "outputs") for s in RUNNABLE)
    assert sorted(a.key for a in arts) == sorted(notes + [key_of(baseline, "run", "summary")])  # nothing else
    assert all(a.type == "markdown" and "cached, nothing recomputed" in a.data for a in arts if a.key in notes)
    summary = next(a for a in arts if a.key == key_of(baseline, "run", "summary"))
    assert "0 computed, 5 cached" in summary.data
    assert all(f"{s}: cache hit" in "\n".join(run_logs(flow_run_id, "evaluate: cache hit")) for s in RUNNABLE)
    assert recomputed(baseline["manifests"], manifests(baseline["root"])) == set()
    assert set(state_names(flow_run_id, RUNNABLE).values()) == {"Cached"}


def test_force_with_an_unchanged_result_keeps_the_dependants_keys_and_cache_hits(baseline, store_copy):
    """Keys follow content: gan_gt recomputed into identical bytes leaves masks, train, evaluate cached."""
    target = "gan_gt"
    results, flow_run_id = run_pipeline(store_copy, force=[target])
    after = manifests(store_copy)
    assert recomputed(baseline["manifests"], after) == {target}
    assert after[target]["files"] == baseline["manifests"][target]["files"]  # the same bytes, again
    assert {s: m["key"] for s, m in after.items()} == {s: m["key"] for s, m in baseline["manifests"].items()}
    names = state_names(flow_run_id, RUNNABLE)
    assert {s for s, n in names.items() if n == "Cached"} == set(RUNNABLE) - {target}


def test_config_change_recomputes_the_stage_and_its_dependants_only(baseline, store_copy):
    change = "train.learning_rate=3e-4"
    expected = {"train", "evaluate"}
    run_pipeline(store_copy, change)
    after = manifests(store_copy, change)
    assert recomputed(baseline["manifests"], after) == expected
    assert all(after[s]["key"] != baseline["manifests"][s]["key"] for s in expected)


def test_deleted_stage_folder_recomputes_instead_of_failing(baseline, store_copy):
    target = "masks"
    shutil.rmtree(store_copy / target)
    results, _ = run_pipeline(store_copy)
    after = manifests(store_copy)
    assert set(after) == set(RUNNABLE)
    # recomputed into the same bytes: train and evaluate keep their keys and stay cached
    assert recomputed(baseline["manifests"], after) == {target}
    assert after[target]["key"] == baseline["manifests"][target]["key"]


def test_same_config_into_an_empty_store_recomputes_everything_with_the_same_keys(baseline, tmp_path):
    """A wiped bucket is a fresh run, not a crash on stale cache; and two stores that ran the same
    config hold the same keys for every stage (timings and hosts stay out of keys), so they can share."""
    root = tmp_path / "store"  # same keys as the baseline, which the server has seen complete
    results, flow_run_id = run_pipeline(root)
    assert set(state_names(flow_run_id, RUNNABLE).values()) == {"Completed"}
    fresh = manifests(root)
    assert {s: m["key"] for s, m in fresh.items()} == {s: m["key"] for s, m in baseline["manifests"].items()}
    assert list(results) == RUNNABLE and fresh["evaluate"]["finished_at"] > baseline["manifests"]["evaluate"]["finished_at"]


# ---------------------------------------------------------------- single-stage flows

def test_stage_flow_alone_resolves_its_inputs_from_storage(baseline, store_copy):
    from flows.stages import STAGE_FLOWS

    target = "evaluate"
    url = STAGE_FLOWS[target](config=request(store_copy), force=True)
    after = manifests(store_copy)
    assert url.endswith(after[target]["key"])
    assert recomputed(baseline["manifests"], after) == {target}
    expected_inputs = {"train": baseline["manifests"]["train"]["key"]}
    assert {i: v["key"] for i, v in after[target]["inputs"].items()} == expected_inputs


def test_stage_flow_without_inputs_fails_once_naming_the_stage_to_run(services, tmp_path):
    from flows.stages import STAGE_FLOWS

    target = "evaluate"
    state = STAGE_FLOWS[target](config=request(tmp_path / "empty"), return_state=True)
    assert state.is_failed()
    with pytest.raises(InputError, match=r"needs prompts.*run prompts first: the deployment comat-prompts/cpu"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id, 1)
    assert runs[target].run_count == 1  # an input error is not retried
    # the task and the flow both fail on it: each says so in one line, no traceback in the run's logs
    logs = run_logs(state.state_details.flow_run_id, "Finished in state Failed('Flow run")
    failures = [m for m in logs if "needs prompts" in m]
    assert len(failures) >= 3 and not any("Traceback" in m or "\n" in m for m in failures), logs
    assert not any("Traceback" in m for m in logs), logs


def test_bad_parameters_are_refused_at_submission(services):
    """Typed parameters: the server refuses a bad preset or stage name before any run exists."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    from comat_core.config import PRESETS, STAGE_NAMES, Preset, StageName
    from flows.pipeline import comat

    assert typing.get_args(Preset) == PRESETS and typing.get_args(StageName) == STAGE_NAMES
    name = f"probe-{time.time_ns()}"
    comat.to_deployment(name=name).apply()
    for params, field in (({"config": {"preset": "sd14"}}, "config.preset"), ({"stages": ["trian"]}, "stages[0]"),
                          ({"config": {"overides": ["x=1"]}}, "config")):
        with pytest.raises(PrefectHTTPStatusError, match=re.escape(f"Validation failed for field '{field}'")):
            run_deployment(f"comat/{name}", parameters=params, timeout=0)


def test_a_bad_value_fails_the_run_at_its_start_with_one_line(services, tmp_path):
    """What the schema cannot check (an override's key) fails the run with the CLI's line, no traceback."""
    from flows.pipeline import comat

    state = comat(config=request(tmp_path, "train.max_stpes=3"), return_state=True)
    assert state.is_failed() and state.message.startswith("comat: error: ") and "max_stpes" in state.message
    assert "\n" not in state.message
    with pytest.raises(ConfigError, match="max_stpes"):  # comat run gets the error back, prints one line
        state.result()
    logs = run_logs(state.state_details.flow_run_id, "comat: error:")
    assert any(m.startswith("comat: error: ") for m in logs) and not any("Traceback" in m for m in logs), logs
    from prefect import get_client

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(state.state_details.flow_run_id).name
    assert name.startswith("tiny: refused, config not valid"), name  # not "tiny: no stages"


def test_a_deployment_run_must_name_its_storage(services, monkeypatch):
    """Under a deployment the preset's ./comat-artifacts would land in the worker's code folder: refused."""
    from flows.stages import STAGE_FLOWS

    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "gpu")
    state = STAGE_FLOWS["gan_gt"](config={"preset": "tiny"}, return_state=True)
    assert state.is_failed()
    assert re.fullmatch(r"comat: error: deployment comat-gan-gt/gpu needs config\.storage .*", state.message), state.message


# ---------------------------------------------------------------- retries

def test_transient_errors_are_retried_and_config_errors_are_not():
    from botocore.exceptions import EndpointConnectionError

    from tasks.stage import is_transient

    assert is_transient(StorageError("cannot write"))
    assert is_transient(OSError("connection reset"))
    assert is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not is_transient(IntegrityError("sha256 mismatch"))
    assert not is_transient(PermissionError("access denied"))
    assert not is_transient(ConfigError("bad key"))
    assert not is_transient(InputError("no prompts"))
    assert not is_transient(RuntimeError("a bug"))
    from prefect.task_engine import TaskRunTimeoutError

    assert not is_transient(TaskRunTimeoutError("ran past its limit"))  # a hung stage would hang again


def test_gpu_stages_carry_the_gpu_tag_and_a_time_limit(monkeypatch):
    from comat_core.stages.registry import STAGES
    from tasks.stage import GPU_TIMEOUT_ENV, STAGE_TASKS, gpu_timeout_seconds

    for name, spec in STAGES.items():
        assert ("gpu" in STAGE_TASKS[name].tags) == spec.gpu
        assert (STAGE_TASKS[name].timeout_seconds is not None) == spec.gpu
    monkeypatch.setenv(GPU_TIMEOUT_ENV, "0.5")
    assert gpu_timeout_seconds() == 1800
    monkeypatch.setenv(GPU_TIMEOUT_ENV, "0")
    assert gpu_timeout_seconds() is None


def test_cache_hits_do_not_take_the_gpu_slot(services, baseline, store_copy):
    """A GPU limit of 0 aborts any task run tagged gpu: an all-cached run still completes, so no cache
    hit asked for a GPU slot (and none waits behind a training that holds it)."""
    from prefect import get_client

    from flows.deploy import GPU_TAG

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=0)
    try:
        results, flow_run_id = run_pipeline(store_copy)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
    runs = task_runs(flow_run_id, len(RUNNABLE))
    assert {s: r.state.name for s, r in runs.items()} == {s: "Cached" for s in RUNNABLE}
    assert not any(GPU_TAG in r.tags for r in runs.values()), {s: r.tags for s, r in runs.items()}


def test_a_fully_cached_run_without_a_server_starts_no_prefect(baseline, tmp_path):
    """comat run with nothing to compute and no PREFECT_API_URL: the keys answer, Prefect is not even
    imported (no temporary server), and the closing lines are those of a run through the flow."""
    import os
    import subprocess
    import sys

    args = ["run", "--storage", str(baseline["root"])] + [a for o in FAST for a in ("--set", o)]
    code = ("import sys, json; from flows.cli import main; rc = main(json.loads(sys.argv[1])); "
            "print('PREFECT-IMPORTED' if 'prefect' in sys.modules else 'no-prefect'); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile that could name a server
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "no-prefect", out.stdout
    assert "temporary server" not in out.stderr and not (tmp_path / "prefect-home" / "prefect.db").exists()
    for stage in RUNNABLE:
        assert f"{stage}: cache hit {baseline['results'][stage]}" in out.stderr, out.stderr
    for stage, url in baseline["results"].items():
        assert re.search(rf"^{stage} +cached +{re.escape(url)}$", out.stdout, re.M), out.stdout  # the run's table
    assert f"LoRA:   {baseline['results']['train']}/lora" in out.stdout


def test_with_a_server_or_work_to_do_the_run_goes_through_prefect(baseline, monkeypatch):
    from flows.cached import cached_results, prefect_server_configured

    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(baseline["root"])}})
    assert prefect_server_configured()  # the test services' PREFECT_API_URL
    assert cached_results(cfg, None, None) is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(baseline["root"].parent / "no-prefect-home"))
    assert cached_results(cfg, None, None) == baseline["results"]
    assert cached_results(cfg, None, ["train"]) is None  # forced: computes
    other = load_config("tiny", overrides=FAST + ["train.max_steps=3"], extra={"storage": {"root": str(baseline["root"])}})
    assert cached_results(other, None, None) is None  # train and evaluate have no output under this config


def test_two_concurrent_runs_on_one_store_compute_each_stage_once(services, baseline, store_copy):
    """One writer per stage key: the second run waits on the lease, then finds the manifest (a cache hit)."""
    import subprocess
    import sys
    from datetime import datetime, timezone

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterStartTime

    for s in ("train", "evaluate"):
        shutil.rmtree(store_copy / s)
    code = ("import sys, json; from flows.pipeline import comat; "
            "comat(config=json.loads(sys.argv[1]), stages=json.loads(sys.argv[2]))")
    t0 = datetime.now(timezone.utc)
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(request(store_copy)), json.dumps(RUNNABLE)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
    after = manifests(store_copy)
    assert {s: m["key"] for s, m in after.items()} == {s: m["key"] for s, m in baseline["manifests"].items()}
    records = {"train": ("metrics.parquet", "curves.png", "checkpoints/"),  # step timings
               "evaluate": ("summary.json", "report.md")}  # they name the store's path, compared below
    for s in ("train", "evaluate"):  # exactly the single-run result
        same = {f: v for f, v in after[s]["files"].items() if not f.startswith(records[s])}
        assert same == {f: v for f, v in baseline["manifests"][s]["files"].items() if not f.startswith(records[s])}
    report = (store_copy / "evaluate" / after["evaluate"]["key"] / "report.md").read_text()
    base_report = (baseline["root"] / "evaluate" / after["evaluate"]["key"] / "report.md").read_text()
    assert report.replace(str(store_copy), "ROOT") == base_report.replace(str(baseline["root"]), "ROOT")
    assert not list((store_copy / "_leases").glob("*.json"))  # released
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[describe(request(store_copy), RUNNABLE)]), start_time=FlowRunFilterStartTime(after_=t0)))
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    text = "\n".join(m for r in runs for m in run_logs(r.id, "evaluate: "))
    for s in ("train", "evaluate"):
        assert text.count(f"{s}: computing") == 1, text
        assert text.count(f"{s}: cache hit") == 1, text  # the other run: waited, then read the manifest


def comat_events(since, prefix: str, expected: int, timeout: float = 30) -> list:
    """Events named ``prefix*`` that occurred after ``since`` (they reach the server asynchronously: poll)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(EventFilter(occurred=EventOccurredFilter(since=since),
                                                  event=EventNameFilter(prefix=[prefix])), limit=50)
        if len(page.events) >= expected or time.time() > deadline:
            return page.events
        time.sleep(0.5)


def test_stage_events_and_the_shipped_automations(services, baseline, store_copy):
    """comat.stage.completed / comat.train.checkpoint reach the server; the automation that evaluates
    after a train run alone fires on the first and starts comat-evaluate/gpu with the same config."""
    from datetime import datetime, timezone

    from prefect import get_client
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterStartTime

    from flows.automations import apply_automations
    from flows.stages import STAGE_FLOWS
    from tasks.stage import config_payload

    evaluate_id = STAGE_FLOWS["evaluate"].to_deployment(name="gpu").apply()
    CustomWebhookNotificationBlock(name="comat", url="http://127.0.0.1:9/").save("comat-test-alerts", overwrite=True)
    assert apply_automations("custom-webhook/comat-test-alerts") == ["comat-notify-on-failure",
                                                                     "comat-evaluate-after-train"]
    since = datetime.now(timezone.utc)
    try:
        notify = Automation.read(name="comat-notify-on-failure")
        assert notify.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
        assert notify.actions[0].type == "send-notification"
        url = STAGE_FLOWS["train"](config=request(store_copy), force=True)
        events = comat_events(since, "comat.", expected=3)
        by_name = {}
        for e in events:
            by_name.setdefault(e.event, []).append(e)
        done = by_name["comat.stage.completed"][0]
        key = baseline["manifests"]["train"]["key"]
        assert done.resource.id == f"comat.stage.train.{key}" and done.resource["comat.cached"] == "false"
        assert done.resource["comat.flow"] == "comat-train" and done.payload["url"] == url
        assert done.payload["figures"]["steps"] == 2 and "concept_loss" in done.payload["figures"]
        cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(store_copy)}})
        assert done.payload["config"] == config_payload(cfg)
        assert sorted(e.payload["step"] for e in by_name["comat.train.checkpoint"]) == [1, 2]

        deadline, runs = time.time() + 60, []
        while not runs and time.time() < deadline:  # the server's trigger service acts on the event
            time.sleep(1)
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[evaluate_id])),
                                             flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=True)))
                runs = [r for r in runs if r.created > since]
        assert len(runs) == 1, "comat-evaluate-after-train did not start comat-evaluate/gpu"
        assert runs[0].parameters["config"] == config_payload(cfg)
    finally:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[evaluate_id]))):
                client.delete_flow_run(run.id)
            client.delete_deployment(evaluate_id)
        for name in ("comat-notify-on-failure", "comat-evaluate-after-train"):
            Automation.read(name=name).delete()


def test_a_lease_on_s3_is_exclusive(services, monkeypatch):
    """On S3 the lease is a conditional PUT (If-None-Match): a second holder is refused by the store."""
    import uuid

    from comat_core.store.lease import StageLease

    monkeypatch.setenv("AWS_ENDPOINT_URL", services["COMAT_TEST_S3_ENDPOINT"])
    store = ArtifactStore(f"s3://{services['COMAT_TEST_S3_BUCKET']}/lease-{uuid.uuid4().hex[:8]}")
    first, second = StageLease(store, "gan_gt", "k", ttl=30), StageLease(store, "gan_gt", "k", ttl=30)
    assert first.try_acquire() and not second.try_acquire()
    with pytest.raises(FileExistsError):  # what makes it exclusive: the store refuses to overwrite
        store.fs.pipe_file(first.path, b"{}", IfNoneMatch="*")
    first.release()
    assert not store.exists(first.path) and second.try_acquire()
    second.release()


def test_gpu_limit_of_one_keeps_two_gpu_stage_runs_from_overlapping(services, baseline, tmp_path):
    """Two runs of a GPU stage submitted together on a limit of 1 (comat deploy --local --gpus 1): one waits."""
    import subprocess
    import sys

    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    from flows.deploy import GPU_TAG, ensure_gpu_limit

    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        shutil.copytree(baseline["root"], root)
    code = "import sys, json; from flows.stages import gan_gt; gan_gt(config=json.loads(sys.argv[1]), force=True)"
    t0 = time.time()
    ensure_gpu_limit(1)
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(request(root))], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1]) for root in roots]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-3000:]
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
    name = f"gan_gt-{baseline['manifests']['gan_gt']['key']}"
    from datetime import datetime, timezone

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=[name]),
            start_time=TaskRunFilterStartTime(after_=datetime.fromtimestamp(t0, timezone.utc))))
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, (first.start_time, first.end_time, second.start_time)


def test_storage_failure_is_retried_then_fails(services, tmp_path):
    """A store root that is a file: every read is an OSError → StorageError → retried."""
    from prefect import flow

    from tasks.stage import STAGE_TASKS, config_payload

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(blocker)}})
    task = STAGE_TASKS["prompts"].with_options(retries=2, retry_delay_seconds=0)

    @flow(name="comat-retry-probe")
    def probe():
        return task(stage="prompts", config=config_payload(cfg), return_state=True)

    state = probe(return_state=True)
    assert state.is_failed()
    with pytest.raises(StorageError):
        state.result()
    runs = task_runs(state.state_details.flow_run_id, 1)
    assert runs["prompts"].run_count == 3


# ---------------------------------------------------------------- crash and resume

def test_crash_in_sharded_stage_then_flow_retry_keeps_completed_shards(services, baseline, store_copy, monkeypatch):
    from flows.pipeline import comat

    stage = "gan_gt"  # 4 prompts, 2 per shard: the crash comes before shard 1
    for s in downstream(BASE_CFG, {stage}):
        shutil.rmtree(store_copy / s)
    monkeypatch.setenv("COMAT_TEST_FAIL_AT_SHARD", f"{stage}:1")
    flow = comat.with_options(retries=1, retry_delay_seconds=0)
    state = flow(config=request(store_copy), stages=["prompts", stage], return_state=True)
    assert state.is_completed()

    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        runs = client.read_task_runs(flow_run_filter=_flow_filter(flow_run.id))
    assert flow_run.run_count == 2  # the first attempt crashed, the retry completed
    failed = [r for r in runs if r.name.startswith(f"{stage}-") and r.state.is_failed()]
    assert failed, "the first attempt should have failed in the sharded stage"
    crash_time = failed[0].state.timestamp.timestamp()

    key = baseline["manifests"][stage]["key"]
    shard_dir = store_copy / stage / key / "_shards"
    committed = {p.stem: json.loads(p.read_text())["committed_at"] for p in sorted(shard_dir.glob("*.json"))}
    assert len(committed) == 2
    names = sorted(committed)
    assert committed[names[0]] < crash_time  # shard 0 was committed by the crashed attempt ...
    assert all(committed[n] > crash_time for n in names[1:])  # ... and kept; the rest came after
    assert manifests(store_copy)[stage]["key"] == key
    from tasks.artifacts import artifact_key, pipeline_scope

    summary = _latest_artifact(artifact_key(pipeline_scope("tiny", ArtifactStore(str(store_copy)).root_url), "run",
                                            "summary"), flow_run.id)
    assert f"| {stage} | computed (resumed: 1 of 2 shards were done) | `{key}` |" in summary.data, summary.data


def test_a_killed_run_says_so_in_its_progress_and_states(services, baseline, store_copy):
    """SIGTERM during training: the progress artifact says interrupted, the task and flow runs both end Crashed."""
    import signal
    import subprocess
    import sys

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from tasks.artifacts import artifact_key, pipeline_scope

    slow = "train.max_steps=60"
    code = ("import sys, json; from flows.pipeline import comat; "
            "comat(config=json.loads(sys.argv[1]), stages=json.loads(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(request(store_copy, slow)), json.dumps(RUNNABLE)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    key = artifact_key(pipeline_scope("tiny", ArtifactStore(str(store_copy)).root_url), "train", "progress")

    def progress():
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)
        return arts[0] if arts else None

    try:
        deadline = time.time() + 180
        while not ((art := progress()) and float(art.data) > 0):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    art = progress()
    assert "interrupted at" in art.description and "a rerun resumes" in art.description, art.description
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(art.flow_run_id)
        train = client.read_task_runs(flow_run_filter=_flow_filter(art.flow_run_id))
    train = [r for r in train if r.name.startswith("train-")]
    assert flow_run.state.type.value == "CRASHED", flow_run.state
    assert [r.state.type.value for r in train] == ["CRASHED"], [r.state for r in train]
    summary = _latest_artifact(artifact_key(pipeline_scope("tiny", ArtifactStore(str(store_copy)).root_url), "run",
                                            "summary"), art.flow_run_id)
    key = compute_key(load_config("tiny", overrides=FAST + [slow], extra={"storage": {"root": str(store_copy)}}),
                      ArtifactStore(str(store_copy)), "train")
    assert f"| train | interrupted | `{key}` |" in summary.data and "a rerun resumes" in summary.data, summary.data


def _flow_filter(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


# ---------------------------------------------------------------- UI artifacts

def _latest_artifact(key: str, flow_run_id):
    """The newest artifact with this key published by this flow run (None if there is none)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                           flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    return arts[0] if arts else None


def key_of(baseline, stage: str, kind: str) -> str:
    from tasks.artifacts import artifact_key, pipeline_scope

    return artifact_key(pipeline_scope("tiny", ArtifactStore(str(baseline["root"])).root_url), stage, kind)


def flow_run_artifacts(flow_run_id, timeout: float = 20) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_parent_run_publishes_a_summary(baseline):
    """Each stage's state, key, time and folder; the headline evaluation; where the outputs are."""
    art = _latest_artifact(key_of(baseline, "run", "summary"), baseline["flow_run_id"])
    assert art is not None and art.type == "markdown"
    text = art.data
    assert "5 computed, 0 cached" in text
    for stage in RUNNABLE:
        m = baseline["manifests"][stage]
        assert re.search(rf"\| {stage} \| computed \| `{m['key']}` \| [0-9.]+ \| `{re.escape(baseline['results'][stage])}` \|", text), stage
    assert "file://" not in text  # a browser opens no file:// link from the UI: local paths are text
    summary = json.loads((Path(baseline["results"]["evaluate"]) / "summary.json").read_text())
    color = summary["results"]["color"]
    head = color["metrics"][color["headline_metric"]]
    assert f"| color | {color['headline_metric']} | {head['base']:.4g} | {head['tuned']:.4g} | {head['delta']:.4g} |" in text
    lora = f"{baseline['results']['train']}/lora"
    assert f"LoRA:   {lora}" in text and f'pipe.load_lora_weights("{lora}")' in text
    assert f"report: {baseline['results']['evaluate']}/report.md" in text


def test_each_stage_publishes_progress_outputs_and_storage_link(baseline):
    run = baseline["flow_run_id"]
    for stage in RUNNABLE:
        manifest = baseline["manifests"][stage]
        progress = _latest_artifact(key_of(baseline, stage, "progress"), run)
        assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
        outputs = _latest_artifact(key_of(baseline, stage, "outputs"), run)
        row = json.loads(outputs.data)[0] if isinstance(outputs.data, str) else outputs.data[0]
        assert row["key"] == manifest["key"] and row["files"] == len(manifest["files"])
        assert row["bytes"] == sum(f["size"] for f in manifest["files"].values())
        link = _latest_artifact(key_of(baseline, stage, "storage"), run)
        assert link.type == "markdown" and f"`{baseline['results'][stage]}`" in link.data, link.data


def test_stage_specific_artifacts_follow_the_manifest(baseline):
    from tasks.artifacts import preview_images

    run = baseline["flow_run_id"]
    for stage in RUNNABLE:
        files = list(baseline["manifests"][stage]["files"])
        images = _latest_artifact(key_of(baseline, stage, "images"), run)
        assert (images is not None) == bool(preview_images(files)), stage
        if images is not None:
            assert "data:image/png;base64," in images.data or "](" in images.data
        has_metrics = any(f.endswith("metrics.parquet") for f in files)
        assert (_latest_artifact(key_of(baseline, stage, "curves"), run) is not None) == has_metrics, stage
        if "summary.json" in files:
            assert _latest_artifact(key_of(baseline, stage, "summary"), run) is not None
    assert "overlay.png" in baseline["manifests"]["masks"]["files"]  # the masks preview
    masks_images = _latest_artifact(key_of(baseline, "masks", "images"), run)
    assert "**overlay.png**" in masks_images.data
    assert "curves.png" in baseline["manifests"]["train"]["files"]  # the chart, beside the table
    chart = _latest_artifact(key_of(baseline, "train", "curves-chart"), run)
    assert chart.type == "markdown" and "![curves.png](data:image/png;base64," in chart.data


def test_progress_reporter_sends_throttled_updates_and_the_final_one(services):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    from tasks.artifacts import ProgressReporter

    def progress(artifact_id) -> float:
        with get_client(sync_client=True) as client:
            art = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))[0]
        return float(art.data)

    from prefect import flow

    @flow(name="comat-progress-probe")
    def probe() -> list[float]:
        reporter = ProgressReporter("gan_gt", "0123456789abcdef", "tiny-probe", every=600)
        reporter.start()
        seen = [progress(reporter.id)]
        reporter.update(1, 10, "shard 0")
        reporter.update(2, 10, "shard 1")  # within `every` of the last update: not sent
        seen.append(progress(reporter.id))
        reporter.update(10, 10, "done")  # the last step is always sent
        seen.append(progress(reporter.id))
        return seen

    assert probe() == [0.0, 10.0, 100.0]


def test_a_stage_that_stopped_says_how_and_a_resumed_one_from_where():
    import asyncio

    from tasks.summary import ending, resumed_note

    assert resumed_note({"resumed_from": 400, "steps": 600}) == " (resumed from step 400)"
    assert resumed_note({"resumed_from": None, "steps": 600}) == ""
    assert resumed_note({"shards": 8, "shards_generated": 3, "shards_reused": 5}) == " (resumed: 5 of 8 shards were done)"
    assert resumed_note({"shards": 8, "shards_generated": 8, "shards_reused": 0}) == ""
    assert ending(asyncio.CancelledError()) == "cancelled"
    assert ending(KeyboardInterrupt()) == "interrupted"
    assert ending(InputError("no prompts")) == "failed"


def test_artifact_helpers():
    import pyarrow as pa

    from tasks.artifacts import artifact_key, curve_rows, pipeline_scope, preview_images, summary_rows

    assert artifact_key("tiny-sdxl-0a1b2c", "gan_gt", "images") == "comat-tiny-sdxl-0a1b2c-gan-gt-images"
    assert pipeline_scope("tiny", "/a") != pipeline_scope("tiny", "/b") != pipeline_scope("sd15", "/b")
    assert re.fullmatch(r"sd15-[0-9a-f]{6}", pipeline_scope("sd15", "s3://bucket/comat"))
    table = pa.table({"step": list(range(1000)), "loss": [1.0 / (i + 1) for i in range(1000)]})
    rows = curve_rows(table)
    assert len(rows) <= 200 and rows[0]["step"] == 0 and rows[-1]["step"] == 999
    assert curve_rows(pa.table({"step": [0], "loss": [float("nan")]})) == [{"step": 0, "loss": None}]
    files = ["preview.png", "latents-00000.safetensors"] + [f"samples/step-{i:06d}.png" for i in range(20)]
    chosen = preview_images(files)
    assert chosen[0] == "preview.png" and len(chosen) == 8 and chosen[-1] == "samples/step-000019.png"
    assert summary_rows({"base": {"color": 0.5}, "tuned": {"color": 0.6}}) == [
        {"name": "base", "color": 0.5}, {"name": "tuned", "color": 0.6}]
    assert summary_rows({"a": 1, "b": {"c": 2}}) == [{"key": "a", "value": 1}, {"key": "b.c", "value": 2}]
    results = {"color": {"headline_metric": "blip_vqa", "metrics": {
        "blip_vqa": {"base": 0.25, "tuned": 0.5, "delta": 0.25, "ci95": [0.125, 0.375], "n_pairs": 4}}}}
    assert summary_rows({"code": {"v": "1"}, "results": results}) == [
        {"category": "color", "metric": "blip_vqa", "headline": True, "base": 0.25, "tuned": 0.5, "delta": 0.25,
         "ci95_low": 0.125, "ci95_high": 0.375, "pairs": 4}]


# ---------------------------------------------------------------- deployments

def test_prefect_yaml_declares_the_deployments_and_the_local_profile_moves_them_to_one_pool():
    from flows.deploy import REPO, load_spec, local_profile, pools_of

    spec = load_spec()
    by_flow = {(d["entrypoint"], d["name"]) for d in spec["deployments"]}
    assert ("flows/pipeline.py:comat", "full-pipeline") in by_flow
    assert ("flows/stages.py:prompts", "cpu") in by_flow
    for stage in ("sdxl_prefinetune", "gan_gt", "masks", "train", "evaluate"):
        assert (f"flows/stages.py:{stage}", "gpu") in by_flow
    retrain = next(d for d in spec["deployments"] if d["name"] == "scheduled-retraining")
    assert retrain["schedules"][0]["cron"] and retrain["schedules"][0]["active"] is False
    assert pools_of(spec) == {"cpu", "gpu"}
    gpu = next(d for d in spec["deployments"] if d["name"] == "gpu")["work_pool"]["job_variables"]
    assert gpu["gpu_count"] == 1 and gpu["image"]

    for d in spec["deployments"]:  # each deployment's tags name its pool, and no other
        assert d["work_pool"]["name"] in d["tags"] and not ({"cpu", "gpu"} - {d["work_pool"]["name"]}) & set(d["tags"])

    local = local_profile(spec)
    assert all("local" in d["tags"] and not {"cpu", "gpu"} & set(d["tags"]) for d in local["deployments"])
    assert pools_of(local) == {"local"}
    assert local["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
    assert [d["name"] for d in local["deployments"]] == [d["name"] for d in spec["deployments"]]


def test_run_forms_require_storage_and_offer_only_accepted_fields():
    from prefect.utilities.callables import parameter_schema

    from flows.deploy import deployment_names, form_schema, load_spec
    from flows.pipeline import comat
    from flows.stages import STAGE_FLOWS

    forms = {}
    for name, d in deployment_names(load_spec()).items():
        flow = comat if name.startswith("comat/") else STAGE_FLOWS[d["entrypoint"].rsplit(":", 1)[1]]
        forms[name] = form_schema(parameter_schema(flow).model_dump(), d)
    for name, form in forms.items():
        request = form["definitions"]["ConfigRequest"]
        assert "storage" in request["required"] and request["properties"]["storage"]["type"] == "string", name
        assert "config" in form["required"], name
        assert ("values" in request["properties"]) == (not name.startswith("comat/")), name  # stage runs get it
    assert [n for n, f in forms.items() if "parallelism" in f["properties"]] == ["comat/full-pipeline-fanout"]


def test_deploy_names_the_missing_work_pool(services):
    from flows.deploy import deploy

    with pytest.raises(ConfigError, match="work pool 'cpu' does not exist.*prefect work-pool create cpu"):
        deploy()
