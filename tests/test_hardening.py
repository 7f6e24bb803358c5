"""Hardening: every failure a one-line error found before work starts, nothing unverified called
complete, nothing wiped before it is replaced, and byte-identical artifacts across reruns."""

import glob
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from fast_run import FAST

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str) -> bool:
    """One line of error; only commands to copy (a missing model's ``hf download``) may follow it."""
    lines = err.splitlines()
    return err.startswith("comat: error: ") and err.endswith("\n") and all(
        line.startswith("hf download ") for line in lines[1:])


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

@pytest.mark.parametrize("make_args, needle", [
    # a folder as the prompt file
    (lambda t: ["--prompts", str(t / "folder")], "is a folder, not a file; give a file"),
    # a folder that is not a model, and a file where a model folder is expected
    (lambda t: ["--set", f"models.pretrained={t / 'notmodel'}"],
     "is a folder without a model (readme.txt); expected a diffusers pipeline folder (with model_index.json)"),
    (lambda t: ["--set", f"models.captioner={t / 'notmodel' / 'readme.txt'}"],
     "is a file (6 bytes); expected a transformers model folder (with config.json)"),
    # control characters and over-long lines, by line number
    (lambda t: ["--prompts", str(t / "nul.txt")], "nul.txt line 2 contains 2 control character(s) (first U+0000)"),
    (lambda t: ["--prompts", str(t / "huge.txt")], "huge.txt line 1 is 3,000 characters long; a prompt may have at most 2,000"),
    # an empty storage root (would write into the current directory)
    (lambda t: ["--set", "storage.root="], "storage.root: Value error, is empty"),
    (lambda t: ["--storage="], "storage.root: Value error, is empty"),
    # found before any stage runs: no GPU, a hub id not downloaded while offline
    (lambda t: ["--set", "runtime.device=cuda"], "runtime.device is cuda but no CUDA GPU is visible"),
    (lambda t: ["--set", "models.captioner=Salesforce/blip-image-captioning-large"],
     "HF_HUB_OFFLINE=1 and 1 model(s) are not in the Hub cache"),
])
def test_bad_input_is_one_line_before_any_stage(capsys, tmp_path, monkeypatch, make_args, needle):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "readme.txt").write_text("hello\n")
    (tmp_path / "nul.txt").write_bytes(b"a red cube\na green\x00\x00 bench\n")
    (tmp_path / "huge.txt").write_text("a" * 3000 + "\n")
    store = tmp_path / "store"
    args = ["run", "--storage", str(store), *make_args(tmp_path)]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and needle in err and one_line_error(err), err
    assert not glob.glob(f"{tmp_path}/**/_manifest.json", recursive=True)
    assert not glob.glob(f"{tmp_path}/**/*.parquet", recursive=True)


# ---------------------------------------------------------------- status and config answer fast

@pytest.mark.parametrize("args", [
    ["config", "--preset", "tiny"],
    ["status", "--preset", "tiny"],
    ["run", "--set", "train.max_stepz=3"],  # a config error
])
def test_status_config_and_config_errors_import_no_torch(tmp_path, args):
    code = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'prefect') if m in sys.modules); "
            "print('HEAVY', heavy, rc)")
    extra = ["--storage", str(tmp_path / "s")] if args[0] == "status" else []
    out = subprocess.run([sys.executable, "-c", code, *args, *extra], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert "HEAVY [] " in out.stdout, out.stdout + out.stderr
    if args[0] == "status":
        assert not (tmp_path / "s").exists()  # status reads, never writes (no probe file, no folder)


def test_tiny_version_and_kinds_are_read_without_importing_tiny():
    from comat_core.models import loader, tiny

    assert loader.builder_version() == tiny.builder_version()
    assert loader.TINY_KINDS == tiny.TINY_KINDS


# ---------------------------------------------------------------- a small complete store to break

SETS = [a for s in FAST for a in ("--set", s)]


def fast_cfg(root, *overrides):
    from comat_core.config import load_config

    return load_config("tiny", overrides=FAST + list(overrides), extra={"storage": {"root": str(root)}})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prompts, gan_gt, masks and train, complete (evaluate is not needed to break things)."""
    from comat_core.stages.registry import run_stage
    from comat_core.store.storage import ArtifactStore

    root = tmp_path_factory.mktemp("hardening") / "store"
    cfg = fast_cfg(root)
    for stage in ("prompts", "gan_gt", "masks", "train"):
        run_stage(cfg, ArtifactStore(root), stage)
    return root


@pytest.fixture
def store_copy(base, tmp_path):
    import shutil

    from comat_core.store.storage import ArtifactStore

    root = tmp_path / "store"
    shutil.copytree(base, root)
    return fast_cfg(root), ArtifactStore(root)


def key_of(cfg, store, stage):
    from comat_core.stages.registry import compute_key

    return compute_key(cfg, store, stage)


def flip_byte(path) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def status_rows(capsys, store, *extra):
    rc = main(["status", "--preset", "tiny", *SETS, "--storage", store.root, *extra])
    out = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.out.splitlines()[1:]}
    return rc, rows, out.err


# ---------------------------------------------------------------- checks of this machine (point 5)

def test_offline_and_device_checks_cover_only_the_stages_that_will_compute(store_copy, monkeypatch):
    """A complete stage loads no model: its models need not be downloaded, nor a GPU be there."""
    import torch

    from comat_core.errors import ConfigError, InputError
    from comat_core.preflight import check_this_machine, model_fields, stages_to_compute

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, store = store_copy
    cfg = fast_cfg(store.root, "runtime.device=cuda", "models.clip=openai/clip-vit-base-patch32")
    assert stages_to_compute(cfg, None, None) == ["evaluate"]  # the fixture stops before evaluate
    assert stages_to_compute(cfg, None, ["masks"]) == ["masks", "train", "evaluate"]
    assert model_fields(cfg, ["masks"]) == ["pretrained", "grounding_dino", "sam"]  # hf backend: no checkpoint
    check_this_machine(cfg, ["prompts", "gan_gt", "masks", "train"])  # all cached: nothing to check
    with pytest.raises(ConfigError, match="runtime.device is cuda but no CUDA GPU"):
        check_this_machine(fast_cfg(store.root, "runtime.device=cuda"), None)
    with pytest.raises(InputError, match=r"openai/clip-vit-base-patch32 \(models.clip\)"):
        check_this_machine(cfg, None)  # evaluate would load CLIP from the hub


# ---------------------------------------------------------------- unreadable manifests (point 3)

def test_unreadable_stage_and_shard_manifests_are_incomplete_and_recomputed(store_copy, capsys, caplog):
    from comat_core.stages.registry import run_stage

    cfg, store = store_copy
    gkey, mkey = key_of(cfg, store, "gan_gt"), key_of(cfg, store, "masks")
    # a torn stage manifest: masks is incomplete (not a crash), named, and recomputed
    Path(store.manifest_path("masks", mkey)).write_bytes(b"\x00\xff not json")
    with caplog.at_level(logging.WARNING, logger="comat.storage"):
        rc, rows, err = status_rows(capsys, store)
    assert rc == 0 and "Traceback" not in err and "partial" in rows["masks"] and "waiting" in rows["train"]
    assert f"stage manifest {store.manifest_path('masks', mkey)} cannot be read" in caplog.text
    res = run_stage(cfg, store, "masks")
    assert not res.cached and res.key == mkey and store.read_manifest("masks", mkey) is not None
    assert res.manifest["summary"]["shards_reused"] == 2  # its shards were intact

    # a torn shard manifest in an uncommitted stage: not counted, recomputed alone
    Path(store.manifest_path("gan_gt", gkey)).unlink()
    shard = Path(store.path("gan_gt", gkey, "_shards", "shard-00000.json"))
    shard.write_text('{"shard": "shard-00000", "files": {')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comat.storage"):
        rc, rows, err = status_rows(capsys, store)
    assert rc == 0 and "partial (1 shards)" in rows["gan_gt"]  # two shards, the torn one does not count
    assert f"shard manifest {shard} cannot be read" in caplog.text
    res = run_stage(cfg, store, "gan_gt")
    assert res.manifest["summary"]["shards_generated"] == 1 and res.manifest["summary"]["shards_reused"] == 1
    json.loads(shard.read_text())  # rewritten


# ---------------------------------------------------------------- status --verify (point 11)

def test_status_verify_names_the_corrupt_file_and_plain_status_stays_cheap(store_copy, capsys):
    cfg, store = store_copy
    gkey = key_of(cfg, store, "gan_gt")
    flip_byte(store.path("gan_gt", gkey, "latents-00001.safetensors"))
    rc, rows, _ = status_rows(capsys, store)
    assert rc == 0 and "complete" in rows["gan_gt"]  # manifests only
    rc, rows, err = status_rows(capsys, store, "--verify")
    assert rc == 1
    assert "corrupt" in rows["gan_gt"] and "latents-00001.safetensors (sha256 mismatch)" in rows["gan_gt"]
    assert "(verified)" in rows["prompts"] and "(verified)" in rows["masks"]
    assert one_line_error(err) and "comat run --force gan_gt" in err


# ---------------------------------------------------------------- corrupt checkpoint on resume (point 12)

def test_corrupt_checkpoint_is_skipped_with_a_warning_naming_it(store_copy, caplog):
    from comat_core.stages.registry import run_stage

    cfg, store = store_copy
    tkey = key_of(cfg, store, "train")
    Path(store.manifest_path("train", tkey)).unlink()  # as if killed after its last checkpoint
    flip_byte(store.path("train", tkey, "checkpoints", "step-000002", "state.safetensors"))
    with caplog.at_level(logging.INFO):
        res = run_stage(cfg, store, "train")
    assert ("checkpoint step 2 skipped on resume: checkpoints/step-000002/state.safetensors does not match its "
            "manifest") in caplog.text
    assert res.manifest["summary"]["resumed_from"] == 1 and res.manifest["summary"]["steps"] == 2


# ---------------------------------------------------------------- --force (point 10)

def test_force_verifies_inputs_before_touching_the_output(store_copy):
    from comat_core.errors import IntegrityError
    from comat_core.stages.registry import run_stage

    cfg, store = store_copy
    gkey, mkey = key_of(cfg, store, "gan_gt"), key_of(cfg, store, "masks")
    def files():
        return {p: Path(p).read_bytes() for p in glob.glob(store.path("masks", mkey, "**"), recursive=True)
                if os.path.isfile(p)}

    before = files()
    flip_byte(store.path("gan_gt", gkey, "latents-00000.safetensors"))
    with pytest.raises(IntegrityError, match="latents-00000.safetensors does not match its manifest"):
        run_stage(cfg, store, "masks", force=True)
    assert files() == before and len(before) > 4


def test_fanned_out_force_verifies_inputs_before_deleting_the_output(store_copy):
    from comat_core.errors import IntegrityError
    from flows.pipeline import run_stage_fanout

    cfg, store = store_copy
    mkey = key_of(cfg, store, "masks")
    flip_byte(store.path("gan_gt", key_of(cfg, store, "gan_gt"), "index-00001.parquet"))
    with pytest.raises(IntegrityError, match="index-00001.parquet does not match its manifest"):
        run_stage_fanout("masks", cfg, force=True, parts=2)  # fails before any part is submitted
    store.reader("masks", mkey).verify()


def test_force_keeps_the_old_output_until_the_new_one_is_committed(store_copy):
    from comat_core.stages.registry import run_stage

    cfg, store = store_copy
    mkey = key_of(cfg, store, "masks")
    old = store.read_manifest("masks", mkey)
    with pytest.raises(RuntimeError, match="fail_at_shard=1"):
        run_stage(cfg, store, "masks", force=True, hooks={"fail_at_shard": 1})
    assert store.read_manifest("masks", mkey) == old  # the failed recompute gave the old output back
    store.reader("masks", mkey).verify()
    res = run_stage(cfg, store, "masks", force=True)
    assert not res.cached and res.manifest["finished_at"] != old["finished_at"]
    assert store.listdir(store.path("masks")) == [mkey]  # nothing set aside is left behind


def test_a_killed_forced_run_is_finished_by_the_next_run_which_then_drops_the_old_output(store_copy):
    """kill -9 during a forced recompute leaves the old output in a hidden folder: the next run finishes
    the recompute (what was asked for), and only after its commit removes the old output."""
    import shutil

    from comat_core.stages.registry import run_stage

    cfg, store = store_copy
    mkey = key_of(cfg, store, "masks")
    path = Path(store.path("masks", mkey))
    aside = Path(store.set_aside(str(path)))  # what the killed run had done first, then one shard
    for rel in ("_shards/shard-00000.json", "masks-00000.parquet", "index-00000.parquet"):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(aside / rel, path / rel)
    assert store.stage_keys("masks") == [mkey] and store.read_manifest("masks", mkey) is None
    res = run_stage(cfg, store, "masks")
    assert not res.cached and res.manifest["summary"]["shards_reused"] == 1
    assert store.listdir(store.path("masks")) == [mkey] and not aside.exists()


# ---------------------------------------------------------------- storage outages and stalls (point 4)

def test_a_stalled_storage_call_is_logged_then_bounded(caplog, monkeypatch):
    import threading
    import time as _time

    from comat_core.errors import StorageError
    from comat_core.store.storage import ArtifactStore

    store = ArtifactStore("memory://hardening-stall", timeout=2)
    real, release = store.fs.pipe_file, threading.Event()

    def stalled(path, data, **kw):  # fsspec shares one memory filesystem: stall only this test's writes
        if "hardening-stall" in path:
            release.wait(60)
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", stalled)
    t0 = _time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="comat.storage"), pytest.raises(
                StorageError, match=r"storage write of memory://.*/x.bin did not finish in 2 s \(storage.timeout\)"):
            store.write_bytes(store.path("x.bin"), b"data")
        assert _time.monotonic() - t0 < 30  # bounded by the timeout, long before the 60 s stall ends
    finally:
        release.set()  # the abandoned worker finishes now, not during a later test
    assert "still waiting after" in caplog.text and "gives up at 2 s" in caplog.text


def test_an_endpoint_that_is_gone_is_a_storage_error_not_a_client_traceback(monkeypatch):
    from comat_core.errors import StorageError
    from comat_core.store.storage import ArtifactStore
    from tasks.stage import is_transient

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    store = ArtifactStore("s3://comat-gone/x", {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}},
                          timeout=30)
    with pytest.raises(StorageError, match=r"cannot (write|reach|check) .*comat-gone") as e:
        store.write_bytes(store.path("a.bin"), b"data")
    assert "\n" not in str(e.value) and is_transient(e.value)


def test_a_failure_inside_the_flow_is_one_line_and_the_traceback_goes_to_the_debug_log(store_copy, tmp_path):
    """A stage failing inside Prefect's flow: no traceback on the console, one line at the end."""
    cfg, store = store_copy
    env = dict(os.environ, COMAT_TEST_FAIL_AT_SHARD="masks:1")  # the session's COMAT_CACHE: tiny models built
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", *SETS,
                          "--storage", store.root, "--stages", "masks", "--force", "masks"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    last = [line for line in out.stderr.splitlines() if line.startswith("comat: error:")]
    assert len(last) == 1 and "RuntimeError: test hook: fail_at_shard=1 (details: " in last[0]
    debug_log = last[0].rsplit("(details: ", 1)[1].rstrip(")")
    assert "Traceback" in Path(debug_log).read_text()
    assert store.read_manifest("masks", key_of(cfg, store, "masks")) is not None  # --force gave the old output back


# ---------------------------------------------------------------- bit-reproducible artifacts (point 13)

RERUN = """
import sys
sys.path.insert(0, {tests!r})
from test_hardening import fast_cfg
from comat_core.stages.registry import run_stage
from comat_core.store.storage import ArtifactStore
cfg = fast_cfg(sys.argv[1])
for stage in ("train", "evaluate"):
    run_stage(cfg, ArtifactStore(cfg.storage.root), stage)
"""


def data_files(root: Path, stage: str) -> dict[str, bytes]:
    """Every file of the stage's one key folder but the manifests (which hold timings by design)."""
    (folder,) = [p for p in (root / stage).iterdir() if not p.name.startswith(".")]
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "_manifest.json" and "_shards" not in p.parts}


def test_two_trainings_with_different_hash_seeds_write_identical_bytes(base, tmp_path):
    """LoRA (its header too), checkpoint tensors, data tables, images and the report: byte-identical
    across two processes with different PYTHONHASHSEED and different storage roots."""
    import shutil

    roots = []
    for seed in ("1", "2"):
        root = tmp_path / f"run-{seed}" / "store"
        shutil.copytree(base, root)
        shutil.rmtree(root / "train")
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", RERUN.format(tests=str(ROOT / "tests")), str(root)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        roots.append(root)
    for stage in ("train", "evaluate"):
        a, b = data_files(roots[0], stage), data_files(roots[1], stage)
        assert a.keys() == b.keys()
        # records of how the run went hold wall-clock seconds by design: the step metrics (and their plot),
        # and the checkpoints' JSON state that carries them; everything else must be equal
        differ = sorted(rel for rel in a if a[rel] != b[rel]
                        and not rel.endswith(("state.json", "metrics.parquet", "curves.png")))
        assert differ == [], f"{stage}: {differ}"
    lora = data_files(roots[0], "train")["lora/pytorch_lora_weights.safetensors"]
    header = json.loads(lora[8:8 + int.from_bytes(lora[:8], "little")])
    assert '"unet.target_modules": [\n    "to_k",\n    "to_out.0",\n    "to_q",\n    "to_v"\n  ]' in \
        header["__metadata__"]["lora_adapter_metadata"]
    assert str(roots[0]) not in data_files(roots[0], "evaluate")["report.md"].decode()


def test_safetensors_metadata_order_is_canonical(tmp_path):
    """safetensors writes metadata in a Rust hash map's order (random per process): sorted on export."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    from comat_core.models.lora import sort_safetensors_metadata

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.int64)}
    meta = {f"key{i}": f"value {i}" for i in range(12)}
    files = []
    for name, order in (("one", meta), ("other", dict(reversed(meta.items())))):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save(tensors, metadata=order))
        sort_safetensors_metadata(path)
        files.append(path)
    assert files[0].read_bytes() == files[1].read_bytes()
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), tensors["b"])
