"""Scale-out: sharded fan-out over Prefect workers, data-parallel training under ``accelerate launch``,
and Prefect result storage on the artifact store.

* Fan-out end to end: the deployments of deployments/prefect.yaml (local profile) on a real Prefect
  server, two ``process`` workers, the parent flow ``comat`` with ``dispatch="deployments"`` and
  ``parallelism=2``: ``gan_gt`` comes out bit-identical to the in-process run, both workers ran a
  part, and a part that fails on its first attempt is queued again and does not redo its shards.
* Training: 2 CPU processes (gloo) through the train stage's own launcher, interrupted after a
  checkpoint, resumed with 1 process x 2 micro-batches; the loss trajectory matches 1 process x 2
  micro-batches from scratch, and so does an uninterrupted 2-process run.
* Result storage: the stage tasks' results land under ``<root>/_prefect-results/`` on moto's S3 and
  on a local folder; the saved block holds no credentials.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from comat_core.store.checkpoint import committed_checkpoints
from comat_core.config import load_config
from comat_core.errors import ConfigError
from comat_core.stages.registry import compute_key, run_stage
from comat_core.store.shards import ShardPart
from comat_core.store.storage import ArtifactStore
from services import services, stop_pid  # noqa: F401 - the session fixture

PREFECT = [sys.executable, "-m", "prefect"]
# 4 prompts; gan_gt: 1 prompt per shard (4 shards), masks: 2; three tiny training steps of 1 prompt per micro-batch
FAST = [
    "prompts.max_prompts=4",
    "gan_gt.shard_size=1", "gan_gt.num_inference_steps=2", "gan_gt.preview_images=2",
    "masks.shard_size=2",
    "train.max_steps=3", "train.batch_size=1", "train.num_inference_steps=2", "train.grad_steps=1",
    "train.losses.attribute_steps=1", "train.checkpoint_every=1", "train.validation_every=3",
]
DATA_STAGES = ["prompts", "gan_gt", "masks"]


def config(root: Path | str, *overrides: str):
    return load_config("tiny", overrides=FAST + list(overrides), extra={"storage": {"root": str(root)}})


def request(root: Path | str, *overrides: str) -> dict:
    return {"preset": "tiny", "storage": str(root), "overrides": FAST + list(overrides)}


def data_files(store: ArtifactStore, cfg, stage: str) -> dict[str, str]:
    """``{file: sha256}`` of a complete stage's shard files (not its preview)."""
    manifest = store.read_manifest(stage, compute_key(cfg, store, stage))
    assert manifest is not None, f"{stage} is not complete"
    return {f: e["sha256"] for f, e in manifest["files"].items() if f.endswith((".safetensors", ".parquet"))}


@pytest.fixture(scope="module")
def inputs_root(tmp_path_factory) -> Path:
    """prompts, gan_gt and masks computed in this process: the single-process reference and the train inputs."""
    root = tmp_path_factory.mktemp("inputs") / "store"
    cfg, store = config(root), ArtifactStore(str(root))
    for stage in DATA_STAGES:
        run_stage(cfg, store, stage)
    return root


# ---------------------------------------------------------------- shard parts (in-process)

def test_shard_parts_split_the_shards_into_contiguous_disjoint_slices():
    for total in (0, 1, 4, 7, 10):
        for count in (1, 2, 3, 4):
            parts = [list(ShardPart(k, count).select(total)) for k in range(count)]
            assert [i for p in parts for i in p] == list(range(total))  # in order, each shard once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert ShardPart.parse([1, 2]) == ShardPart(1, 2) == ShardPart.parse("1/2") and str(ShardPart(1, 2)) == "2/2"
    for bad in ([2, 2], [0, 0], [-1, 3], "x", [1]):
        with pytest.raises(ConfigError):
            ShardPart.parse(bad)


def test_parts_then_commit_pass_equal_one_run(inputs_root, tmp_path):
    """Two parts leave the stage uncommitted; the last call finds all shards done and only commits."""
    root = tmp_path / "store"
    shutil.copytree(inputs_root / "prompts", root / "prompts")
    cfg, store = config(root), ArtifactStore(str(root))
    key = compute_key(cfg, store, "gan_gt")
    with pytest.raises(ConfigError, match="force"):
        run_stage(cfg, store, "gan_gt", force=True, shard_part=ShardPart(0, 2))
    with pytest.raises(ConfigError, match="not sharded"):
        run_stage(cfg, store, "train", shard_part=ShardPart(0, 2))
    parts = [run_stage(cfg, store, "gan_gt", shard_part=ShardPart(k, 2)) for k in (1, 0)]
    assert all(r.partial and not r.cached for r in parts)
    assert [r.manifest["summary"]["shards"] for r in parts] == [["shard-00002", "shard-00003"],
                                                                ["shard-00000", "shard-00001"]]
    assert store.read_manifest("gan_gt", key) is None
    final = run_stage(cfg, store, "gan_gt")
    assert not final.partial and final.manifest["summary"]["shards_generated"] == 0
    assert final.manifest["summary"]["shards_reused"] == 4
    assert data_files(store, cfg, "gan_gt") == data_files(ArtifactStore(str(inputs_root)), config(inputs_root), "gan_gt")


# ---------------------------------------------------------------- fan-out on two workers

@pytest.fixture
def fanout_env(services, tmp_path, monkeypatch):
    """Variables for ``prefect deploy`` and the workers: one thread, fast polling, a fail-once hook."""
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    return {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_WORKER_QUERY_SECONDS": "1",
            # the second part (shards 2 and 3) fails before shard 3 on its first attempt only
            "COMAT_TEST_FAIL_AT_SHARD": "gan_gt:3"}


@pytest.fixture
def two_workers(fanout_env, tmp_path):
    procs = {}
    for name in ("comat-worker-a", "comat-worker-b"):
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            procs[name] = (subprocess.Popen(PREFECT + ["worker", "start", "--pool", "local", "--type", "process",
                                                       "--limit", "1", "--name", name],
                                            env=fanout_env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True), log)
    yield procs
    for proc, _ in procs.values():
        stop_pid(proc.pid)


def _run_in_thread(fn, timeout: float, logs: list[Path]):
    """Call ``fn`` (the parent flow) with a deadline, so a stuck worker fails the test instead of hanging it."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(state=fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the parent flow did not finish in {timeout:.0f} s; worker logs:\n"
                    + "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs))
    return out["state"]


def _child_runs(client, parent_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def _workers_by_flow_run(client, run_ids: set[str], timeout: float = 30) -> dict[str, str]:
    """``{flow run id: worker name}`` from the workers' ``submitted-flow-run`` events (sent asynchronously)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    deadline, found = time.time() + timeout, {}
    query = EventFilter(event=EventNameFilter(name=["prefect.worker.submitted-flow-run"]),
                        related=EventRelatedFilter(id=[f"prefect.flow-run.{i}" for i in run_ids]))
    while time.time() < deadline:
        page = client.read_events(query, limit=50)
        for event in page.events:
            for related in event.related:
                run_id = related.id.removeprefix("prefect.flow-run.")
                if related.id.startswith("prefect.flow-run.") and run_id in run_ids:
                    found[run_id] = event.resource.get("prefect.resource.name")
        if set(found) >= run_ids:
            break
        time.sleep(1)
    return found


@pytest.mark.slow
def test_gan_gt_fans_out_over_two_workers_bit_identically(inputs_root, fanout_env, two_workers, tmp_path):
    from prefect import get_client

    from flows.deploy import deploy
    from flows.pipeline import comat

    assert deploy(local=True) == 0
    root = tmp_path / "store"
    shutil.copytree(inputs_root / "prompts", root / "prompts")  # the same prompts: the same gan_gt key
    state = _run_in_thread(lambda: comat(config=request(root), stages=["gan_gt"], dispatch="deployments",
                                         parallelism=2, return_state=True),
                           timeout=360, logs=[log for _, log in two_workers.values()])
    results = state.result()
    cfg, store = config(root), ArtifactStore(str(root))
    assert results["gan_gt"] == store.stage_url("gan_gt", compute_key(cfg, store, "gan_gt"))
    assert results["gan_gt"].endswith(compute_key(config(inputs_root), ArtifactStore(str(inputs_root)), "gan_gt"))
    # bit-identical to the single-process run
    assert data_files(store, cfg, "gan_gt") == data_files(ArtifactStore(str(inputs_root)), config(inputs_root), "gan_gt")
    assert len([f for f in data_files(store, cfg, "gan_gt") if f.startswith("latents-")]) == 4

    with get_client(sync_client=True) as client:
        children = _child_runs(client, state.state_details.flow_run_id)
        parts = sorted((c for c in children if c.parameters.get("part")), key=lambda c: c.parameters["part"])
        assert [c.parameters["part"] for c in parts] == [[0, 2], [1, 2]]
        assert all(c.state.is_completed() for c in children), [(c.name, c.state.name) for c in children]
        assert re.fullmatch(r"tiny [0-9a-f]{6}@[0-9a-f]{6}: gan_gt \[part 2/2\]", parts[1].name), parts[1].name
        # both workers ran a part
        workers = _workers_by_flow_run(client, {str(c.id) for c in parts})
        assert set(workers.values()) == {"comat-worker-a", "comat-worker-b"}, workers
        # the failed part ran twice, and its second attempt did not redo the shard its first attempt committed
        assert (parts[0].run_count, parts[1].run_count) == (1, 2)
        running = sorted(s.timestamp for s in client.read_flow_run_states(parts[1].id) if s.type.value == "RUNNING")
        assert len(running) == 2
    writer = store.writer("gan_gt", compute_key(cfg, store, "gan_gt"))
    committed = {n: writer.shard_meta(n)["committed_at"] for n in ("shard-00002", "shard-00003")}
    assert committed["shard-00002"] < running[1].timestamp() < committed["shard-00003"]
    # the commit pass was one more run of the stage deployment, which generated nothing
    old = store.read_manifest("gan_gt", writer.key)
    assert old["summary"]["shards_generated"] == 0

    # forced: the parts and the commit write into one staging folder, promoted over the old output at the end
    state = _run_in_thread(lambda: comat(config=request(root), stages=["gan_gt"], force=["gan_gt"],
                                         dispatch="deployments", parallelism=2, return_state=True),
                           timeout=360, logs=[log for _, log in two_workers.values()])
    assert state.result()["gan_gt"] == results["gan_gt"]
    new = store.read_manifest("gan_gt", writer.key)
    assert new["finished_at"] != old["finished_at"] and new["files"] == old["files"]
    store.reader("gan_gt", writer.key).verify()
    assert store.listdir(store.path("gan_gt")) == [writer.key]  # the staging folder became the output
    with get_client(sync_client=True) as client:
        staged = {c.parameters.get("staged") for c in _child_runs(client, state.state_details.flow_run_id)}
    assert len(staged) == 1 and re.fullmatch(rf"\.{writer.key}\.staged-[0-9a-f]{{8}}", staged.pop())


# ---------------------------------------------------------------- data-parallel training

def _losses(root: Path, cfg) -> list[tuple[int, float, str]]:
    store = ArtifactStore(str(root))
    key = compute_key(cfg, store, "train")
    table = pq.read_table(root / "train" / key / "metrics.parquet")
    return list(zip(table["step"].to_pylist(), table["loss"].to_pylist(), table["prompt_ids"].to_pylist()))


@pytest.mark.slow
def test_two_process_training_checkpoints_resumes_with_one_and_matches(inputs_root, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="comat")
    roots = {name: tmp_path / name / "store" for name in ("interrupted", "single", "launched")}
    for root in roots.values():
        shutil.copytree(inputs_root, root)
    two, one = ("train.num_processes=2",), ("train.gradient_accumulation_steps=2",)
    store = {n: ArtifactStore(str(r)) for n, r in roots.items()}
    key = compute_key(config(roots["single"], *one), store["single"], "train")
    assert compute_key(config(roots["single"], *two), store["single"], "train") == key  # same global batch, same key
    assert compute_key(config(roots["single"], *two, "train.gradient_accumulation_steps=2"),
                       store["single"], "train") != key

    # 2 processes (gloo), stopped by a test hook once step 1 is checkpointed
    with pytest.raises(RuntimeError, match="accelerate launch exited"):
        run_stage(config(roots["interrupted"], *two), store["interrupted"], "train", hooks={"fail_after_step": 1})
    writer = store["interrupted"].writer("train", key)
    assert [c.step for c in committed_checkpoints(writer)] == [1]
    state = json.loads(store["interrupted"].read_bytes(writer.path("checkpoints/step-000001/state.json")))
    assert (state["global_batch"], state["data_position"]) == (2, 2)
    assert store["interrupted"].read_manifest("train", key) is None

    # resumed with 1 process x 2 micro-batches: same key, same folder
    resumed = run_stage(config(roots["interrupted"], *one), store["interrupted"], "train")
    assert resumed.key == key and resumed.manifest["summary"]["resumed_from"] == 1
    assert resumed.manifest["summary"]["steps"] == 3

    single = run_stage(config(roots["single"], *one), store["single"], "train")
    caplog.clear()
    capsys.readouterr()
    launched = run_stage(config(roots["launched"], *two), store["launched"], "train")
    # rank 0's step lines reach this process's log, with elapsed time and ETA; no library bars from the children
    steps = [r.getMessage() for r in caplog.records if r.name == "comat.train"]
    assert [int(m.group(1)) for m in map(re.compile(r"step (\d)/3: loss .* \| elapsed \d\d:\d\d, ETA \d\d:\d\d").match,
                                         steps) if m] == [1, 2, 3], steps
    printed = capsys.readouterr()
    assert not re.search(r"Loading (weights|pipeline components)|\d+%\|", printed.out + printed.err), printed.out
    assert launched.manifest["summary"]["global_batch"] == single.manifest["summary"]["global_batch"] == 2
    assert any(f.startswith("lora/") for f in launched.manifest["files"])  # the launched run's files, verified
    reference = _losses(roots["single"], config(roots["single"], *one))
    for name in ("interrupted", "launched"):
        run = _losses(roots[name], config(roots[name], *one))
        assert [(s, p) for s, _, p in run] == [(s, p) for s, _, p in reference]  # same global sample order
        assert [v for _, v, _ in run] == pytest.approx([v for _, v, _ in reference], rel=1e-5), name


def test_launch_command_for_several_machines():
    from comat_core.stages.train.launch import check_layout, launch_command

    cfg = config("/tmp/x", "train.num_processes=8", "train.num_machines=2", "train.machine_rank=1",
                 "train.main_process_ip=10.0.0.1", "train.main_process_port=29555")
    cmd = launch_command(cfg, Path("/tmp/request.json"))
    joined = " ".join(cmd)
    assert "accelerate.commands.launch --multi_gpu --num_processes 8 --num_machines 2" in joined
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29555" in joined
    assert cmd[-4:] == ["-m", "comat_core.stages.train.launch", "--request", "/tmp/request.json"]
    assert "--main_process_port 0" in " ".join(launch_command(config("/tmp/x", "train.num_processes=2"), Path("r")))
    for bad, match in ((["train.num_processes=3", "train.num_machines=2", "train.main_process_ip=h"], "multiple"),
                       (["train.num_processes=2", "train.num_machines=2"], "main_process_ip"),
                       (["train.machine_rank=1"], "below")):
        with pytest.raises(ConfigError, match=match):
            check_layout(config("/tmp/x", *bad))


# ---------------------------------------------------------------- result storage

def test_task_results_persist_on_s3_without_credentials_in_the_block(services, monkeypatch):
    import boto3
    from prefect import get_client

    from flows.pipeline import comat
    from tasks.results import RESULTS_DIR, block_name

    endpoint, bucket = services["COMAT_TEST_S3_ENDPOINT"], services["COMAT_TEST_S3_BUCKET"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    prefix = f"results-{uuid.uuid4().hex[:8]}"
    root = f"s3://{bucket}/{prefix}"
    urls = comat(config=request(root), stages=["prompts"])
    s3 = boto3.client("s3", endpoint_url=endpoint)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{RESULTS_DIR}/").get("Contents", [])
    assert len(listed) == 1
    record = json.loads(s3.get_object(Bucket=bucket, Key=listed[0]["Key"])["Body"].read())
    assert json.loads(record["result"]) == urls["prompts"]  # JSON, not pickle
    assert record["metadata"]["serializer"]["type"] == "json"

    basepath = f"{root}/{RESULTS_DIR}"
    with get_client(sync_client=True) as client:
        block = client.read_block_document_by_name(block_name("s3", basepath, json.dumps({"endpoint_url": endpoint})),
                                                   "comat-result-storage")
    assert block.data == {"basepath": basepath, "settings": {"endpoint_url": endpoint}, "timeout": 300.0}
    assert str(block.id) == record["metadata"]["storage_block_id"]


def test_task_results_persist_on_a_local_store(services, tmp_path):
    from flows.pipeline import comat
    from tasks.results import RESULTS_DIR

    root = tmp_path / "store"
    first = comat(config=request(root), stages=["prompts"])
    second = comat(config=request(root), stages=["prompts"])  # a cache hit by manifest: writes nothing
    files = sorted((root / RESULTS_DIR).rglob("*.json"))
    assert {f.parent.name for f in files} == {"prompts"}  # <stage>/<task run id>.json
    records = [json.loads(f.read_text()) for f in files]
    assert [json.loads(r["result"]) for r in records] == [first["prompts"]] and second == first
