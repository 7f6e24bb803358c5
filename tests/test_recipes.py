"""The README's "A real run" recipes, as written, on the tiny preset, through to ``comat export``.

The bash blocks of sections 4 (one GPU) and 5 (eight GPUs, fan-out) and the export line of section 7
are read from README.md and run in bash with ``comat`` as this checkout's CLI. Only what makes them
tiny is replaced, and each replacement must find its text, so a README that drifts fails here: the
preset and paths, the smallest run's overrides added to the config array, and 2 processes standing
in for 8. Every command of a recipe must compute the stage keys the train command computed.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from comat_core.config import load_config
from comat_core.stages.registry import compute_key
from comat_core.store.storage import ArtifactStore
from fast_run import FAST
from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def section_block(title: str, lang: str = "bash") -> str:
    """The first ``lang`` code block after the README heading that starts with ``title``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n### {title}")
    return re.search(rf"```{lang}\n(.*?)```", readme[start:], re.S).group(1)


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the README recipe no longer holds {old!r}"
    return text.replace(old, new)


def tiny(block: str, store: Path) -> str:
    block = replace(block, "preset: sd15", "preset: tiny")
    block = replace(block, "/data/comat/sd15", str(store))
    block = replace(block, "'/data/comat-src/collected_data/*.txt'", "'builtin:tiny_prompts.txt'")
    sets = " ".join(f"--set {o}" for o in FAST)
    return replace(block, "C=(--config run.yaml)", f"C=(--config run.yaml {sets})")


def run_recipe(script: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "COMAT_PY": sys.executable}
    bash = "set -euo pipefail\ncomat() { \"$COMAT_PY\" -m flows.cli \"$@\"; }\n" + script
    done = subprocess.run(["bash", "-c", bash], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, script + "\n" + done.stdout[-3000:] + done.stderr[-5000:]
    assert "dedicated Prefect server" not in done.stderr  # Prefect's advice, on every run: kept off the console
    return done.stdout


def stage_keys(cfg, store) -> dict[str, str]:
    return {s: compute_key(cfg, store, s) for s in cfg.stage_order()}


def check_run(tmp_path: Path, store_root: Path, out: str) -> None:
    """Every stage complete under the recipe's config file, and the export holds the trained LoRA."""
    cfg = load_config(config_file=tmp_path / "run.yaml", overrides=FAST)
    store = ArtifactStore(str(store_root))
    keys = stage_keys(cfg, store)
    assert all(store.is_complete(s, k) for s, k in keys.items()), keys
    status = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert {row[0]: row[2] for row in status if row[0] in keys} == dict.fromkeys(keys, "complete")
    lora = tmp_path / "comat-sd15-lora"
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == store.reader(
        "train", keys["train"]).read_bytes("lora/pytorch_lora_weights.safetensors")
    assert (lora / "evaluation" / "report.md").is_file() and (lora / "base" / "model_index.json").is_file()


@pytest.mark.slow
def test_one_gpu_recipe_as_written_runs_to_export(tmp_path):
    script = tiny(section_block("4. Train on one GPU"), tmp_path / "store")
    script += section_block("7. The result")
    out = run_recipe(script, tmp_path)
    check_run(tmp_path, tmp_path / "store", out)
    # `comat run`'s end: the stage table once, the headline evaluation under its warning, the diffusers lines
    assert sum(line.startswith("evaluate  computed") for line in out.splitlines()) == 1
    assert "evaluation (headline metric per category" in out and "carry no meaning" in out
    assert "pipe.load_lora_weights(" in out


@pytest.mark.slow
def test_eight_gpu_recipe_as_written_runs_to_export_with_two_processes(tmp_path, capsys):
    script = tiny(section_block("5. Train on one box with 8 GPUs"), tmp_path / "store")
    script = replace(replace(script, "N=8", "N=2"), "num_processes: 8", "num_processes: 2")
    out = run_recipe(script + section_block("7. The result"), tmp_path)
    check_run(tmp_path, tmp_path / "store", out)
    for stage in ("gan_gt", "masks", "evaluate"):  # the parts ran, then the commit run
        assert (tmp_path / f"{stage}-1.log").read_text().count(f"part 1/2 done, stage not committed") == 1

    # a command without the layout looks for another train key: it names the complete training and
    # what differs, and advises no command that would train again
    rc = main(["run", "--storage", str(tmp_path / "store"), *[a for o in FAST for a in ("--set", o)],
               "--stages", "evaluate", "--part", "0/2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    cfg = load_config(config_file=tmp_path / "run.yaml", overrides=FAST)
    trained = ArtifactStore(str(tmp_path / "store")).stage_url("train", compute_key(
        cfg, ArtifactStore(str(tmp_path / "store")), "train"))
    assert f"a complete train output with other settings is at {trained}" in err
    assert "micro-batches per step (gradient_accumulation_steps x num_processes): 2 there, 1 here" in err
    assert "comat run --stages train" not in err
    rc = main(["status", "--storage", str(tmp_path / "store"), *[a for o in FAST for a in ("--set", o)]])
    train = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("train "))
    assert rc == 0 and "missing" in train and f"complete under other settings: {trained}" in train
