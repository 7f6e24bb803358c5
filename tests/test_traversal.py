"""No name read from the store leads outside its folder: export, evaluate, resume, the masks reader.

Each test plays someone who can write to the store (a shared folder, a bucket) and plants a name
that leads out: a manifest entry with ``..`` (on S3 the key holds ``../`` literally, and the file is
really there), an absolute path, a symbolic link to a file or folder outside. Each time the reader
refuses with one line naming where the name came from, and nothing is written outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import pytest
import torch

from comat_core.config import load_config
from comat_core.stages.registry import compute_key, run_stage
from comat_core.store.checkpoint import load_latest_checkpoint, save_checkpoint
from comat_core.store.paths import UnsafePathError, path_problem
from comat_core.store.storage import MANIFEST, ArtifactStore, FileEntry
from fast_run import FAST
from flows.cli import main

LORA = "lora/pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def s3_root():
    """A fresh prefix on moto's S3 server: the one .ci/run started, or one started here."""
    from services import BUCKET, TEST_CREDENTIALS, start_moto

    saved = {k: os.environ.get(k) for k in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    moto = None
    endpoint, bucket = os.environ.get("COMAT_TEST_S3_ENDPOINT"), os.environ.get("COMAT_TEST_S3_BUCKET", BUCKET)
    if not endpoint:
        moto = start_moto()
        endpoint, bucket = moto.url, moto.extra["bucket"]
    os.environ.update({k: os.environ.get(k) or v for k, v in TEST_CREDENTIALS.items()}, AWS_ENDPOINT_URL=endpoint)
    try:
        yield lambda: f"s3://{bucket}/traversal-{uuid.uuid4().hex[:8]}"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if moto is not None:
            moto.stop()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes: a snapshot to compare."""
    return {str(p): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"<link>")
            for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def upstream(root: str) -> tuple:
    """A config and a store whose prompts, gan_gt and masks are committed (empty) under their real keys,
    so that train's and evaluate's keys, the ones export and evaluate read, can be computed."""
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": root}})
    store = ArtifactStore(root)
    for stage in ("prompts", "gan_gt", "masks"):
        store.writer(stage, compute_key(cfg, store, stage)).commit(config={}, inputs={})
    return cfg, store


def plant(store: ArtifactStore, stage: str, key: str, planted: dict[str, bytes], links: dict[str, Path] = {}) -> None:
    """Commit a stage whose manifest lists ``planted`` names (each file really stored, under the literal
    key on an object store, where its ``..`` leads on local disk) and ``links`` (local: a symbolic link
    to an outside file, listed with that file's sha256), besides one ordinary LoRA file."""
    writer = store.writer(stage, key)
    writer.put_bytes(LORA, b"ordinary weights")
    base = store.path(stage, key)
    for rel, data in planted.items():
        target = f"{base}/{rel}"
        if store.is_local:
            target = os.path.normpath(target) if not rel.startswith("/") else rel
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Path(target).write_bytes(data)
        else:
            store.fs.pipe_file(target, data)
        writer.files[rel] = FileEntry(len(data), hashlib.sha256(data).hexdigest())
    for rel, outside in links.items():
        link = Path(base, rel)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(outside)
        data = outside.read_bytes() if outside.is_file() else b""
        writer.files[rel] = FileEntry(len(data), hashlib.sha256(data).hexdigest())
    writer.commit(config={}, inputs={})


def one_line_refusal(text: str, name: str) -> None:
    """``text`` (an error, or stderr less the libraries' own log lines) is one line refusing ``name``."""
    lines = [line for line in text.splitlines() if not re.match(r"\d{4}-\d\d-\d\d [\d:,]+ (DEBUG|INFO) ", line)]
    assert len(lines) == 1 and "refused" in lines[0] and repr(name)[1:-1] in lines[0], text


# ---------------------------------------------------------------- the check itself

@pytest.mark.parametrize("rel", ["../x", "lora/../../x", "/etc/passwd", "lora\\..\\x", "C:/x", "lora//x", "./x",
                                 "lora/./x", "", "a\nb"])
def test_unsafe_names_are_named(rel):
    assert path_problem(rel) is not None


@pytest.mark.parametrize("rel", ["lora/pytorch_lora_weights.safetensors", "checkpoints/step-000002/state.json",
                                 "_shards/index-00000.json", "a..b/..c"])
def test_ordinary_names_pass(rel):
    assert path_problem(rel) is None


# ---------------------------------------------------------------- comat export

@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_export_refuses_a_manifest_entry_leading_out(capsys, tmp_path, kind):
    root = tmp_path / "store"
    evil = "lora/../../../escaped.bin" if kind == "dotdot" else str(tmp_path / "planted" / "absolute.bin")
    cfg, store = upstream(str(root))
    plant(store, "train", compute_key(cfg, store, "train"), {evil: b"planted"})
    before = tree(tmp_path)
    out = tmp_path / "exports" / "deep" / "lora-out"
    rc = main(["export", "--storage", str(root), *[a for o in FAST for a in ("--set", o)], "--to", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("comat: error: ") and "manifest" in err
    one_line_refusal(err, evil)
    assert tree(tmp_path) == before and not (tmp_path / "exports").exists()


def test_export_refuses_a_link_out_of_the_stage_folder(capsys, tmp_path):
    root, secret = tmp_path / "store", tmp_path / "elsewhere" / "private.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"not for export")
    cfg, store = upstream(str(root))
    plant(store, "train", compute_key(cfg, store, "train"), {}, links={"lora/comat.json": secret})
    out = tmp_path / "lora-out"
    rc = main(["export", "--storage", str(root), *[a for o in FAST for a in ("--set", o)], "--to", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "symbolic link" in err
    one_line_refusal(err, str(root / "train"))
    assert not out.exists() and not any(b"not for export" == p.read_bytes() for p in tmp_path.rglob("*")
                                        if p.is_file() and not p.is_symlink() and p != secret)


def test_export_from_s3_refuses_a_literal_dot_dot_key(capsys, tmp_path, s3_root):
    root = s3_root()
    cfg, store = upstream(root)
    evil = "lora/../../../../escaped-from-s3.bin"
    plant(store, "train", compute_key(cfg, store, "train"), {evil: b"planted in the bucket"})
    assert store.fs.exists(f"{store.path('train', compute_key(cfg, store, 'train'))}/{evil}")  # the key is real
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    rc = main(["export", "--storage", root, *[a for o in FAST for a in ("--set", o)], "--to", str(work / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    one_line_refusal(err, evil)
    assert tree(tmp_path) == {} and not (tmp_path / "escaped-from-s3.bin").exists()


# ---------------------------------------------------------------- evaluate

@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_evaluate_refuses_a_train_manifest_entry_leading_out(tmp_path, kind):
    root = tmp_path / "store"
    evil = "lora/../../../escaped.bin" if kind == "dotdot" else str(tmp_path / "planted" / "absolute.bin")
    cfg, store = upstream(str(root))
    plant(store, "train", compute_key(cfg, store, "train"), {evil: b"planted"})
    before = tree(tmp_path)
    with pytest.raises(UnsafePathError) as e:
        run_stage(cfg, store, "evaluate")
    one_line_refusal(str(e.value), evil)
    assert "train" in str(e.value) and MANIFEST in str(e.value)
    assert tree(tmp_path) == before


def test_evaluate_lora_download_refuses_links_out(tmp_path):
    """The read evaluate makes of train's LoRA (``download_tree`` into its scratch folder)."""
    root, outside = tmp_path / "store", tmp_path / "elsewhere"
    (outside / "sub").mkdir(parents=True)
    (outside / "weights.bin").write_bytes(b"outside file")
    cfg, store = upstream(str(root))
    key = compute_key(cfg, store, "train")
    plant(store, "train", key, {}, links={"lora/extra.bin": outside / "weights.bin"})
    scratch = tmp_path / "scratch"
    before = tree(tmp_path)
    with pytest.raises(UnsafePathError, match="symbolic link") as e:
        store.reader("train", key).download_tree("lora", scratch / "lora")
    assert "\n" not in str(e.value)
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith(str(scratch))} == before
    # a linked folder: writing through it is refused too (nothing lands in ``outside/sub``)
    (root / "train" / key / "lora" / "linked").symlink_to(outside / "sub")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        store.writer("train", key).put_bytes("lora/linked/new.bin", b"x")
    assert list((outside / "sub").iterdir()) == []


# ---------------------------------------------------------------- train resume

def _checkpointed(root: str):
    writer = ArtifactStore(root).writer("train", "k")
    for step in (1, 2):
        save_checkpoint(writer, step, {"a.safetensors": {"x": torch.full((2,), float(step))}}, {"s.json": {"step": step}})
    return writer


def _edit_shard(writer, step: int, rename: dict[str, str]) -> None:
    path = writer.shard_manifest_path(f"checkpoint-step-{step:06d}")
    shard = json.loads(writer.store.read_bytes(path))
    shard["files"] = {rename.get(rel, rel): entry for rel, entry in shard["files"].items()}
    writer.store.write_bytes(path, json.dumps(shard).encode())


@pytest.mark.parametrize("evil", ["checkpoints/step-000002/../../../../escaped.safetensors", "/etc/hostname",
                                  f"{LORA}"])
def test_resume_refuses_a_checkpoint_file_outside_its_folder(tmp_path, evil):
    writer = _checkpointed(str(tmp_path / "store"))
    data = writer.store.read_bytes(writer.path("checkpoints/step-000002/a.safetensors"))
    if not evil.startswith("/"):  # really there, with the sha256 the shard lists
        target = Path(os.path.normpath(f"{writer.store.path('train', 'k')}/{evil}"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    _edit_shard(writer, 2, {"checkpoints/step-000002/a.safetensors": evil})
    before = tree(tmp_path)
    with pytest.raises(UnsafePathError) as e:
        load_latest_checkpoint(writer.store.writer("train", "k"))
    one_line_refusal(str(e.value), evil)
    assert tree(tmp_path) == before


def test_resume_refuses_a_checkpoint_file_linked_out(tmp_path):
    writer = _checkpointed(str(tmp_path / "store"))
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(writer.store.read_bytes(writer.path("checkpoints/step-000002/a.safetensors")))
    link = Path(writer.store.path("train", "k", "checkpoints/step-000002/a.safetensors"))
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symbolic link") as e:
        load_latest_checkpoint(writer.store.writer("train", "k"))
    assert "\n" not in str(e.value)


def test_resume_on_s3_refuses_a_literal_dot_dot_key(tmp_path, s3_root):
    writer = _checkpointed(s3_root())
    evil = "checkpoints/step-000002/../../../../../escaped.safetensors"
    data = writer.store.read_bytes(writer.path("checkpoints/step-000002/a.safetensors"))
    writer.store.fs.pipe_file(f"{writer.store.path('train', 'k')}/{evil}", data)
    _edit_shard(writer, 2, {"checkpoints/step-000002/a.safetensors": evil})
    with pytest.raises(UnsafePathError) as e:
        load_latest_checkpoint(writer.store.writer("train", "k"))
    one_line_refusal(str(e.value), evil)
    # a listing that yields ``..`` (a key ``checkpoints/../x`` on S3) is refused, not deleted through
    writer.store.fs.pipe_file(f"{writer.store.path('train', 'k')}/checkpoints/../x", b"x")
    _edit_shard(writer, 2, {evil: "checkpoints/step-000002/a.safetensors"})
    assert ".." in writer.store.listdir(writer.store.path("train", "k", "checkpoints"))  # how S3 lists it
    with pytest.raises(UnsafePathError, match="'..'") as e:
        load_latest_checkpoint(writer.store.writer("train", "k"))
    assert "\n" not in str(e.value) and writer.store.fs.exists(f"{writer.store.path('train', 'k')}/checkpoints/../x")


# ---------------------------------------------------------------- the masks reader

def test_masks_reader_refuses_names_and_links_leading_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from comat_core.stages.masks.reader import MaskReader

    store = ArtifactStore(str(tmp_path / "store"))
    evil = "index-00000.parquet/../../../../index-00009.parquet"
    plant(store, "masks", "k", {evil: b"not parquet"})
    with pytest.raises(UnsafePathError) as e:
        MaskReader(store.reader("masks", "k"))
    one_line_refusal(str(e.value), evil)

    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"prompt_id": ["p"], "sample": [0]}), outside)
    plant(store, "masks", "k2", {}, links={"index-00000.parquet": outside})
    with pytest.raises(UnsafePathError, match="symbolic link"):
        MaskReader(store.reader("masks", "k2"))
