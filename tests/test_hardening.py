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

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str) -> bool:
    return err.startswith("comat: error: ") and err.count("\n") == 1


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


def test_offline_and_device_checks_skip_stages_already_complete(tmp_path, monkeypatch):
    """A complete stage loads no model: its models need not be downloaded, nor a GPU be there."""
    from comat_core.preflight import build_config, model_fields, stages_to_compute

    cfg = build_config({"preset": "tiny", "storage": str(tmp_path)})
    assert stages_to_compute(cfg, None, None) == cfg.stage_order()  # nothing there yet
    assert model_fields(cfg, ["prompts"]) == ["pretrained"]
    assert set(model_fields(cfg, ["masks"])) == {"pretrained", "grounding_dino", "sam"}  # hf backend: no checkpoint


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
