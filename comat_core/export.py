"""``comat export``: the trained LoRA out of the artifact store, into a folder ready for the Hub.

The folder holds what ``pipe.load_lora_weights(folder)`` needs (``pytorch_lora_weights.safetensors``
and ``comat.json``, copied from the ``train`` stage's ``lora/`` and checked against its manifest),
for SDXL with the pre-finetune the fine-tuned UNet the LoRA was trained on (``unet/``), the
evaluation report when the ``evaluate`` stage is complete (``evaluation/``), and a model card
(``README.md``: base model, how to load it, training settings, prompts, evaluation table), so that
``hf upload <user>/<repo> <folder>`` publishes a self-describing model.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from comat_core.config import ComatConfig
from comat_core.errors import InputError, IntegrityError, StorageError
from comat_core.stages.registry import compute_key
from comat_core.store.storage import ArtifactStore

EVALUATION_FILES = ("report.md", "summary.json", "grid.png", "chart.png")
PICTURES = ("grid.png", "chart.png")  # also beside the card, which embeds the report and so its pictures


def export(cfg: ComatConfig, store: ArtifactStore, to: str | Path) -> dict:
    """Write the export folder ``to`` (created; must be empty if it exists). Returns what was written."""
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"--to {to}: exists and is not an empty folder; choose a new one")
    try:
        train = store.reader("train", compute_key(cfg, store, "train"))
    except IntegrityError:
        raise  # a corrupt or tampered store says so itself
    except StorageError as e:
        raise StorageError(f"nothing to export: {e}") from None
    if not train.list(prefix="lora/"):
        raise StorageError(f"{train.url} has no lora/ folder; rerun the train stage with --force train")
    tmp = to.with_name(to.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    train.download_tree("lora", tmp)
    written = {"lora": train.url + "/lora", "unet": None, "evaluation": None}
    if "sdxl_prefinetune" in cfg.stage_order():
        pre = store.reader("sdxl_prefinetune", compute_key(cfg, store, "sdxl_prefinetune"))
        pre.download_tree("unet", tmp / "unet")
        written["unet"] = pre.url + "/unet"
    evaluation = _complete_evaluation(cfg, store)
    if evaluation is not None:
        for name in EVALUATION_FILES:
            if name in evaluation.files:
                (tmp / "evaluation").mkdir(exist_ok=True)
                (tmp / "evaluation" / name).write_bytes(evaluation.read_bytes(name))
        _pictures_beside_card(tmp)
        written["evaluation"] = evaluation.url
    prompts = store.reader("prompts", compute_key(cfg, store, "prompts"))
    (tmp / "README.md").write_text(model_card(cfg, train.summary, prompts.summary,
                                              (tmp / "evaluation" / "report.md") if evaluation else None,
                                              with_unet=written["unet"] is not None))
    if to.exists():
        to.rmdir()
    tmp.rename(to)
    written["to"] = str(to)
    return written


def _pictures_beside_card(folder: Path) -> None:
    """Copy the evaluation's grid and chart next to ``README.md``: the card embeds the report, whose
    image links (``![..](chart.png)``) are relative to the report's folder, so they resolve there too."""
    for name in PICTURES:
        if (folder / "evaluation" / name).is_file():
            shutil.copyfile(folder / "evaluation" / name, folder / name)


def _complete_evaluation(cfg: ComatConfig, store: ArtifactStore):
    if "evaluate" not in cfg.stage_order():
        return None
    try:
        key = compute_key(cfg, store, "evaluate")
    except StorageError:
        return None
    return store.reader("evaluate", key) if store.is_complete("evaluate", key) else None


def model_card(cfg: ComatConfig, train: dict, prompts: dict, report: Path | None, with_unet: bool) -> str:
    """A Hugging Face model card: YAML header, how to load, settings, data, evaluation."""
    base = cfg.models.pretrained
    header = {"library_name": "diffusers", "pipeline_tag": "text-to-image",
              "tags": ["lora", "comat", "text-to-image", "diffusers"]}
    if not base.startswith(("tiny://", "/", ".", "~")) and base.count("/") == 1:
        header["base_model"] = base  # a Hub id; a local folder would be meaningless to readers
    pipe = "StableDiffusionXLPipeline" if cfg.models.family == "sdxl" else "StableDiffusionPipeline"
    load = ["import torch", f"from diffusers import {pipe}",
            f'pipe = {pipe}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")']
    if with_unet:
        load = ["import torch", f"from diffusers import {pipe}, UNet2DConditionModel",
                'unet = UNet2DConditionModel.from_pretrained("<this repo>", subfolder="unet", torch_dtype=torch.float16)',
                f'pipe = {pipe}.from_pretrained("{base}", unet=unet, torch_dtype=torch.float16).to("cuda")']
    load += ['pipe.load_lora_weights("<this repo>")', 'image = pipe("a red cube and a blue sphere").images[0]']
    tc = cfg.train
    settings = {
        "train": {k: v for k, v in tc.model_dump(mode="json").items() if k not in ("validation_prompts",)},
        "models": cfg.models.model_dump(mode="json"),
        "runtime": cfg.runtime.model_dump(mode="json"),
    }
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# CoMat LoRA for {base}", "",
        "A LoRA fine-tuned with CoMat (image-to-text concept matching, arXiv 2404.03653) by the comat",
        "pipeline: the model samples images with gradients, a frozen captioner scores how well each image",
        "explains its prompt, an attention loss keeps each attribute on its object, and a latent",
        "discriminator keeps the images close to the base model's.", "",
        "## Use", "", "```python", *load, "```", "",
    ]
    if with_unet:
        lines += ["The LoRA was trained on the 512-px fine-tuned SDXL UNet in `unet/`; load both.", ""]
    lines += [
        "## Training", "",
        f"- steps: {train.get('steps')}, global batch: {train.get('global_batch')}, "
        f"prompts: {train.get('prompts')}, trainable parameters: {train.get('trainable_parameters')}",
        "- final losses: " + ", ".join(f"{k} {v:.4g}" for k, v in train.get("final", {}).items()), "",
        f"Training prompts: {', '.join(cfg.prompts.sources)}; after deduplication and removal of the "
        f"evaluation prompts: {json.dumps({k: v for k, v in prompts.items() if isinstance(v, int)})}", "",
        "<details><summary>Full training configuration</summary>", "", "```yaml",
        yaml.safe_dump(settings, sort_keys=False).strip(), "```", "", "</details>", "",
        "## Evaluation", "",
    ]
    if report is not None:
        lines += [re.sub(r"^(#+) ", r"##\1 ", report.read_text().strip(), flags=re.M), ""]  # under this card's "##"
    else:
        lines += ["Not evaluated yet (run the `evaluate` stage and export again).", ""]
    lines += ["## Licence", "", "The base model's licence applies; add it to this card's header "
              "(`license:`) before publishing.", ""]
    return "\n".join(lines)
