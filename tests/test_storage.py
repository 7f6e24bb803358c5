"""Artifact store: stage keys, atomic writes, manifests last, shards, verification."""

import json
import os
import time
import uuid

import pytest
import torch

from comat_core.config import load_config
from comat_core.errors import IntegrityError, StorageError
from comat_core.stages.registry import stage_config
from comat_core.store.storage import MANIFEST, ArtifactStore, stage_key


def mem_store():
    return ArtifactStore(f"memory://test-{uuid.uuid4().hex}")


def test_stage_key_same_inputs_same_key():
    k1 = stage_key("gan_gt", {"a": 1, "b": [1, 2]}, {"prompts": "x"}, "1")
    assert k1 == stage_key("gan_gt", {"b": [1, 2], "a": 1}, {"prompts": "x"}, "1")
    assert k1 != stage_key("gan_gt", {"a": 2, "b": [1, 2]}, {"prompts": "x"}, "1")
    assert k1 != stage_key("gan_gt", {"a": 1, "b": [1, 2]}, {"prompts": "y"}, "1")
    assert k1 != stage_key("gan_gt", {"a": 1, "b": [1, 2]}, {"prompts": "x"}, "2")
    assert k1 != stage_key("masks", {"a": 1, "b": [1, 2]}, {"prompts": "x"}, "1")


def test_unrelated_config_does_not_change_stage_config():
    base = load_config("tiny")
    other = load_config("tiny", overrides=["train.learning_rate=0.5", "evaluate.images_per_prompt=3"])
    for stage in ("gan_gt", "masks"):
        assert stage_config(base, stage) == stage_config(other, stage)
    assert stage_config(base, "train") != stage_config(other, "train")
    changed = load_config("tiny", overrides=["gan_gt.seed=5"])
    assert stage_config(base, "gan_gt") != stage_config(changed, "gan_gt")
    assert stage_config(base, "masks") == stage_config(changed, "masks")


@pytest.mark.parametrize("make", [mem_store, "local"])
def test_manifest_written_last_and_verified(make, tmp_path):
    store = ArtifactStore(str(tmp_path / "root")) if make == "local" else make()
    w = store.writer("gan_gt", "k1")
    w.put_bytes("a.bin", b"hello")
    w.put_tensors("t.safetensors", {"x": torch.arange(6.0).reshape(2, 3)})
    w.put_table("i.parquet", [{"prompt_id": "p", "row": 0}])
    assert not store.is_complete("gan_gt", "k1")
    manifest = w.commit(config={"c": 1}, inputs={})
    assert store.is_complete("gan_gt", "k1")
    assert set(manifest["files"]) == {"a.bin", "t.safetensors", "i.parquet"}
    r = store.reader("gan_gt", "k1")
    assert r.read_bytes("a.bin") == b"hello"
    assert torch.equal(r.read_tensors("t.safetensors")["x"], torch.arange(6.0).reshape(2, 3))
    assert r.read_table("i.parquet").to_pylist() == [{"prompt_id": "p", "row": 0}]
    store.write_bytes(store.path("gan_gt", "k1", "a.bin"), b"hellO")  # tamper
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        r.read_bytes("a.bin")
    with pytest.raises(IntegrityError):
        r.verify()


def test_interrupted_write_leaves_no_manifest_and_no_partial_file(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    w = store.writer("prompts", "k")
    real_fsync = os.fsync

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StorageError, match="disk full"):
        w.put_bytes("prompts.parquet", b"x" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (tmp_path / "prompts" / "k" / "prompts.parquet").exists()
    assert not (tmp_path / "prompts" / "k" / MANIFEST).exists()
    assert store.read_manifest("prompts", "k") is None


def test_shards_commit_and_corruption_detected():
    store = mem_store()
    w = store.writer("gan_gt", "k")
    w.put_bytes("latents-00000.bin", b"aaaa")
    assert not w.shard_done("shard-00000")  # files without the shard manifest don't count
    w.commit_shard("shard-00000", ["latents-00000.bin"], {"n": 1})
    fresh = store.writer("gan_gt", "k")
    assert fresh.shard_done("shard-00000")
    assert "latents-00000.bin" in fresh.files
    store.write_bytes(store.path("gan_gt", "k", "latents-00000.bin"), b"aaab")
    assert not store.writer("gan_gt", "k").shard_done("shard-00000")
    assert store.writer("gan_gt", "k").committed_shards() == ["shard-00000"]


def test_manifest_lists_config_inputs_versions():
    store = mem_store()
    w = store.writer("train", "k")
    w.put_json("x.json", {"a": 1})
    m = w.commit(config={"lr": 1}, inputs={"prompts": {"key": "abc"}}, summary={"steps": 3}, code_version="1")
    on_disk = json.loads(store.read_bytes(store.manifest_path("train", "k")))
    assert on_disk == json.loads(json.dumps(m, default=str))
    assert on_disk["software"]["torch"] and on_disk["inputs"]["prompts"]["key"] == "abc"
    assert on_disk["files"]["x.json"]["sha256"]


def test_unknown_protocol_and_unreachable_endpoint():
    with pytest.raises(StorageError, match="is not usable"):
        ArtifactStore("foo://bucket/x")
    store = ArtifactStore("s3://comat-bucket/x", {"endpoint_url": "http://127.0.0.1:9", "key": "a", "secret": "b",
                                                   "config_kwargs": {"retries": {"max_attempts": 1},
                                                                     "connect_timeout": 1}})
    with pytest.raises(StorageError, match="not reachable"):
        store.check_reachable()


@pytest.mark.parametrize("root", ["local", "memory://lease-test"])
def test_a_stage_lease_has_one_holder_and_expires_when_its_holder_stops(root, tmp_path):
    from comat_core.store.lease import StageLease, stage_lease

    store = ArtifactStore(str(tmp_path) if root == "local" else f"{root}-{tmp_path.name}")
    first, second = StageLease(store, "gan_gt", "k1", ttl=30), StageLease(store, "gan_gt", "k1", ttl=30)
    assert first.try_acquire() and not second.try_acquire()
    assert StageLease(store, "gan_gt", "k1", part="1-2").try_acquire()  # a fan-out part leases its own slice
    first.release()
    assert second.try_acquire()  # released: the next one gets it
    dead = StageLease(store, "masks", "k2", ttl=0.01)  # a holder that died without releasing
    assert dead.try_acquire()
    time.sleep(0.05)
    assert StageLease(store, "masks", "k2").try_acquire()  # expired: taken over

    finished = {"done": False}
    holder = StageLease(store, "train", "k3", ttl=30)
    assert holder.try_acquire()

    def other_run_finishes():
        time.sleep(0.3)
        finished["done"] = True
    import threading

    threading.Thread(target=other_run_finishes).start()
    with stage_lease(store, "train", "k3", done=lambda: finished["done"], poll=0.05) as compute:
        assert compute is False  # waited, then found the stage complete: nothing to compute
    with pytest.raises(StorageError, match=r"train k3 is being computed by pid \d+ on .*waited 0 s"):
        with stage_lease(store, "train", "k3", poll=0.05, wait=0.1):
            pass


HOLD_AND_DIE = """
import os, sys
from comat_core.store.lease import StageLease
from comat_core.store.storage import ArtifactStore
assert StageLease(ArtifactStore(sys.argv[1]), "masks", "k1").try_acquire()
os._exit(0)  # gone without releasing, as after kill -9
"""


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    import logging
    import subprocess
    import sys

    from comat_core.store.lease import StageLease, holders

    store = ArtifactStore(str(tmp_path))
    subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(tmp_path)], check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    (left,) = holders(store, "masks", "k1")
    assert left["pid"] != os.getpid() and left["expires"] > time.time() + 200  # far from expiring
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="comat.lease"):
        assert StageLease(store, "masks", "k1").try_acquire()
    assert time.monotonic() - t0 < 5
    assert f"held by pid {left['pid']} on " in caplog.text and "a process that is gone; taking the lease over now" \
        in caplog.text


def test_a_lease_this_process_could_not_delete_is_taken_over_by_its_next_attempt(tmp_path, caplog):
    """A failed attempt whose lease delete failed (a stalled store): the retry in the same process takes it
    over at once; a live lease of this process is still exclusive; one of another host waits for its expiry."""
    import logging

    from comat_core.store.lease import StageLease

    store = ArtifactStore(str(tmp_path))
    failed = StageLease(store, "train", "k1")
    assert failed.try_acquire()
    assert not StageLease(store, "train", "k1").try_acquire()  # held by a live attempt of this process

    def stalled_delete():
        raise StorageError("storage delete of x did not finish in 2 s (storage.timeout); is the endpoint up?")

    failed._remove = stalled_delete
    with caplog.at_level(logging.INFO, logger="comat.lease"):
        failed.release()  # logged, not raised: the stage's own error is what the task reports
        assert "could not delete the lease" in caplog.text
        assert StageLease(store, "train", "k1").try_acquire()
    assert "an earlier attempt of this process; taking the lease over now" in caplog.text

    other = json.loads(open(store.path("_leases", "train-k1.json")).read())
    other.update(owner="x", host="elsewhere", host_id="elsewhere/boot", token="t")
    with open(store.path("_leases", "train-k1.json"), "w") as f:
        json.dump(other, f)
    assert not StageLease(store, "train", "k1").try_acquire()  # another host: only the expiry tells
    other["expires"] = time.time() - 1
    with open(store.path("_leases", "train-k1.json"), "w") as f:
        json.dump(other, f)
    assert StageLease(store, "train", "k1").try_acquire()
