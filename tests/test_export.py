"""``comat export``: the trained LoRA leaves the store as a folder diffusers loads, with a model card."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comat_core.config import load_config
from comat_core.stages.registry import compute_key, run_stage
from comat_core.store.storage import ArtifactStore
from fast_run import FAST as TINY_RUN
from flows.cli import main

# The shared smallest tiny run, checkpointed once, at its last step.
FAST = TINY_RUN + ["train.checkpoint_every=2"]


def cli(capsys, root, *args):
    sets = [a for o in FAST for a in ("--set", o)]
    rc = main([args[0], "--storage", str(root), *sets, *args[1:]])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-store")
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(root)}})
    store = ArtifactStore(str(root))
    for stage in ("prompts", "gan_gt", "masks", "train"):
        run_stage(cfg, store, stage)
    return cfg, store, root


def run_printed_code(code: str, cwd: Path) -> Path:
    """Execute diffusers lines as printed, in a fresh interpreter, offline; returns the image they save."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the printed lines need diffusers and torch, not comat
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, code + "\n" + done.stderr[-3000:]
    return cwd / "comat.png"


def card_code(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_export_before_training_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = cli(capsys, tmp_path / "empty-store", "export", "--to", str(tmp_path / "out"))
    assert rc == 2 and err.startswith("comat: error: nothing to export") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_exported_lora_loads_in_diffusers_and_the_card_describes_it(capsys, trained, tmp_path):
    cfg, store, root = trained
    out = tmp_path / "comat-lora"
    rc, stdout, err = cli(capsys, root, "export", "--to", str(out))
    assert rc == 0, err
    assert "load_lora_weights" in stdout and str(out) in stdout
    lora = store.reader("train", compute_key(cfg, store, "train"))
    for name in ("pytorch_lora_weights.safetensors", "comat.json"):
        assert (out / name).read_bytes() == lora.read_bytes(f"lora/{name}")  # the manifest-checked bytes
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "base_model" not in card  # tiny://sd15 is not a Hub id
    assert "max_steps: 2" in card and "Not evaluated yet" in card
    assert json.loads((out / "comat.json").read_text())["steps"] == 2
    assert "random tiny model" in card  # not publishable as a result

    # the card's lines as printed: the tiny base model from the export's base/, on the CPU, offline
    code = card_code(card)
    assert "tiny://" not in code and '.to("cuda")' not in code and "torch_dtype" not in code
    assert "safety_checker=None" in code and "height=64, width=64" in code
    (tmp_path / "card").mkdir()
    assert run_printed_code(code, tmp_path / "card").stat().st_size > 0

    # the three lines of the card, on the tiny model: the LoRA changes what the pipeline draws
    from comat_core.models.loader import load_sd_pipeline

    pipe = load_sd_pipeline("tiny://sd15", "sd15")

    def draw():
        return pipe(["a red cube"], num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        before = draw()
        pipe.load_lora_weights(str(out))
        after = draw()
    assert abs(after - before).max() > 0

    # a second export into the same (now full) folder is refused, the folder is left as it was
    rc, _, err = cli(capsys, root, "export", "--to", str(out))
    assert rc == 2 and "not an empty folder" in err
    assert (out / "README.md").read_text() == card


def test_export_carries_the_evaluation_report_once_evaluated(capsys, trained, tmp_path):
    cfg, store, root = trained
    run_stage(cfg, store, "evaluate")
    out = tmp_path / "with-eval"
    rc, stdout, err = cli(capsys, root, "export", "--to", str(out))
    assert rc == 0, err
    report = (out / "evaluation" / "report.md").read_text()
    assert (out / "evaluation" / "summary.json").is_file() and (out / "evaluation" / "grid.png").is_file()
    card = (out / "README.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| color |")]
    assert table and table[0] in card and "Not evaluated yet" not in card
    assert "\n### Evaluation: base vs tuned" in card  # the report's headings sit under the card's own
    assert "with evaluation" in stdout
    # the grid and the chart: beside the report and beside the card, embedded in both
    for name in ("grid.png", "chart.png"):
        assert (out / name).is_file() and (out / "evaluation" / name).is_file()
        assert f"]({name})" in card and f"]({name})" in report
    from tasks.artifacts import evaluation_pictures  # the run summary artifact embeds the same two pictures

    pictures = evaluation_pictures(store, {"evaluate": store.stage_url("evaluate", compute_key(cfg, store, "evaluate"))})
    assert [p.split("**")[1] for p in pictures] == ["chart.png", "grid.png"]
    assert all("](data:image/png;base64," in p for p in pictures)
    # 1 pair from random models: the report and the card say the numbers carry no meaning
    assert "These numbers carry no meaning" in report and card.index("carry no meaning") < card.index("## Use")


def test_closing_lines_of_a_run_execute_as_printed(trained, tmp_path):
    """``comat run``'s last lines: the tiny base model from comat's cache, the LoRA from the store."""
    from tasks.summary import closing_lines

    cfg, store, root = trained
    results = {s: store.stage_url(s, compute_key(cfg, store, s)) for s in ("prompts", "gan_gt", "masks", "train")}
    lines = closing_lines(cfg, store, results)
    code = "\n".join(line[4:] for line in lines if line.startswith("    "))
    assert "from_pretrained(" in code and "resolve_model" not in code and "tiny://" not in code
    assert run_printed_code(code, tmp_path).stat().st_size > 0


def test_sdxl_export_carries_the_prefinetuned_unet_the_lora_was_trained_on(capsys, tmp_path):
    from diffusers import UNet2DConditionModel

    from comat_core.models.loader import load_sd_pipeline

    fast = FAST + ["sdxl_prefinetune.num_images=2", "sdxl_prefinetune.max_steps=1",
                   "sdxl_prefinetune.num_inference_steps=2", "train.max_steps=1"]
    cfg = load_config("tiny-sdxl", overrides=fast, extra={"storage": {"root": str(tmp_path / "store")}})
    store = ArtifactStore(str(tmp_path / "store"))
    for stage in ("prompts", "sdxl_prefinetune", "gan_gt", "masks", "train"):
        run_stage(cfg, store, stage)
    out = tmp_path / "sdxl-lora"
    rc = main(["export", "--preset", "tiny-sdxl", "--storage", str(tmp_path / "store"),
               *[a for o in fast for a in ("--set", o)], "--to", str(out)])
    assert rc == 0, capsys.readouterr().err
    pre = store.reader("sdxl_prefinetune", compute_key(cfg, store, "sdxl_prefinetune"))
    name = "diffusion_pytorch_model.safetensors"
    assert (out / "unet" / name).read_bytes() == pre.read_bytes(f"unet/{name}")
    exported, stored = json.loads((out / "unet" / "config.json").read_text()), pre.read_json("unet/config.json")
    assert {k: v for k, v in exported.items() if k != "sample_size"} == {
        k: v for k, v in stored.items() if k != "sample_size"}
    pipe = load_sd_pipeline("tiny://sdxl", "sdxl")
    # the UNet says the size it was fine-tuned at (64 px here; 512 px, sample_size 64, for SDXL)
    assert exported["sample_size"] * pipe.vae_scale_factor == cfg.train.resolution
    card = (out / "README.md").read_text()
    code = card_code(card)
    assert "StableDiffusionXLPipeline" in code and f'"{out.resolve()}/unet"' in code and "height=64, width=64" in code
    (tmp_path / "card").mkdir()
    assert run_printed_code(code, tmp_path / "card").stat().st_size > 0

    # the fine-tuned UNet, then the LoRA on top of it
    pipe.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    pipe.load_lora_weights(str(out))
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # PEFT starts B at zero: these are the trained ones
