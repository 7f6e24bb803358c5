"""``comat export``: the trained LoRA leaves the store as a folder diffusers loads, with a model card."""

import json

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
    from flows.artifacts import evaluation_pictures  # the run summary artifact embeds the same two pictures

    pictures = evaluation_pictures(store, {"evaluate": store.stage_url("evaluate", compute_key(cfg, store, "evaluate"))})
    assert [p.split("**")[1] for p in pictures] == ["chart.png", "grid.png"]
    assert all("](data:image/png;base64," in p for p in pictures)


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
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (out / "unet" / name).read_bytes() == pre.read_bytes(f"unet/{name}")
    card = (out / "README.md").read_text()
    assert 'subfolder="unet"' in card and "StableDiffusionXLPipeline" in card

    # the card's lines: the fine-tuned UNet, then the LoRA on top of it
    pipe = load_sd_pipeline("tiny://sdxl", "sdxl")
    pipe.unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    pipe.load_lora_weights(str(out))
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # PEFT starts B at zero: these are the trained ones
