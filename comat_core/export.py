"""``comat export``: the trained LoRA out of the artifact store, into a folder ready for the Hub.

The folder holds what ``pipe.load_lora_weights(folder)`` needs (``pytorch_lora_weights.safetensors``
and ``comat.json``, copied from the ``train`` stage's ``lora/`` and checked against its manifest),
for SDXL with the pre-finetune the fine-tuned UNet the LoRA was trained on (``unet/``), the
evaluation report when the ``evaluate`` stage is complete (``evaluation/``), and a model card
(``README.md``: base model, how to load it, training settings, prompts, evaluation table), so that
``hf upload <user>/<repo> <folder>`` publishes a self-describing model.

The card's diffusers lines run as printed on the machine the model is for: a Hub base model in fp16
on a GPU, the safety checker left out (comat does not download it); a base model comat builds (the
tiny presets' random models, the shapes world's trained one) is copied into the export as ``base/``
and loaded from there in fp32 on the CPU. Images are drawn at the resolution the LoRA was trained at
(512 px for SDXL after the pre-finetune, whose exported UNet config says so).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from comat_core.config import ComatConfig
from comat_core.errors import InputError, IntegrityError, StorageError
from comat_core.stages.registry import compute_key, missing_input_advice
from comat_core.store.storage import ArtifactStore

EVALUATION_FILES = ("report.md", "summary.json", "grid.png", "chart.png")
PICTURES = ("grid.png", "chart.png")  # also beside the card, which embeds the report and so its pictures
EXAMPLE_PROMPT = "a red book and a yellow vase"


def builds_base(cfg: ComatConfig) -> bool:
    """The base model is one comat builds (tiny:// random models, world://), not a Hub id or a folder."""
    from comat_core.models.loader import is_tiny, is_world

    return is_tiny(cfg.models.pretrained) or is_world(cfg.models.pretrained)


def diffusers_lines(cfg: ComatConfig, base: str, lora: str, unet: str | None = None,
                    prompt: str = EXAMPLE_PROMPT) -> list[str]:
    """Python lines that load ``base`` with the LoRA (and the pre-finetuned ``unet``) and draw one image.

    Hub models: fp16 on a GPU; models comat builds (tiny, world): fp32 on the CPU, where they run.
    ``safety_checker=None``: its weights are not among the files comat downloads or needs."""
    sdxl = cfg.models.family == "sdxl"
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    cpu = builds_base(cfg)
    dtype = "torch.float32" if cpu else "torch.float16"
    from comat_core.models.loader import is_tiny, is_world

    vae = cfg.models.vae if cfg.models.vae and not (is_tiny(cfg.models.vae) or is_world(cfg.models.vae)) else None
    imports = [pipeline] + (["UNet2DConditionModel"] if unet else []) + (["AutoencoderKL"] if vae else [])
    lines = ["import torch", f"from diffusers import {', '.join(imports)}"]
    parts = [json.dumps(base)]
    if unet:
        lines.append(f"unet = UNet2DConditionModel.from_pretrained({json.dumps(unet)}, dtype={dtype})")
        parts.append("unet=unet")
    if vae:
        lines.append(f"vae = AutoencoderKL.from_pretrained({json.dumps(vae)}, dtype={dtype})")
        parts.append("vae=vae")
    if not sdxl:
        parts += ["safety_checker=None", "requires_safety_checker=False"]
    parts.append(f"dtype={dtype}")
    device = "" if cpu else '.to("cuda")'
    lines.append(f"pipe = {pipeline}.from_pretrained({', '.join(parts)}){device}")
    size = cfg.train.resolution
    lines += [f"pipe.load_lora_weights({json.dumps(lora)})",
              f"image = pipe({json.dumps(prompt)}, height={size}, width={size}).images[0]  # the resolution it was trained at",
              'image.save("comat.png")']
    return lines


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
        hint = missing_input_advice(cfg, store, "train", "")
        raise StorageError(f"nothing to export: {e}" + (f"; {hint}" if hint else "")) from None
    if not train.list(prefix="lora/"):
        raise StorageError(f"{train.url} has no lora/ folder; rerun the train stage with --force train")
    tmp = to.with_name(to.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    train.download_tree("lora", tmp)
    written = {"lora": train.url + "/lora", "unet": None, "evaluation": None}
    if "sdxl_prefinetune" in cfg.stage_order():
        pre = store.reader("sdxl_prefinetune", compute_key(cfg, store, "sdxl_prefinetune"))
        pre.download_tree("unet", tmp / "unet")
        set_sample_size(tmp / "unet", cfg.train.resolution // vae_scale(cfg))
        written["unet"] = pre.url + "/unet"
    if builds_base(cfg):
        copy_base(cfg, store, tmp / "base")
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
                                              with_unet=written["unet"] is not None, folder=to.resolve()))
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


def copy_base(cfg: ComatConfig, store: ArtifactStore, dst: Path) -> None:
    """A base model comat builds, as a diffusers folder in the export: the tiny model from the cache,
    the world's trained one from its stage."""
    from comat_core.models.loader import is_tiny, resolve_model

    name = cfg.models.pretrained
    if is_tiny(name):
        shutil.copytree(resolve_model(name, "models.pretrained"), dst)
    else:  # world://<folder>: a folder of the world stage
        store.reader("world", compute_key(cfg, store, "world")).download_tree(name.split("://", 1)[1], dst)


def vae_scale(cfg: ComatConfig) -> int:
    """Pixels per latent cell: from the base model's VAE config when comat builds it, else 8 (SD, SDXL)."""
    if not builds_base(cfg):
        return 8
    from comat_core.models.loader import resolve_model

    config = Path(resolve_model(cfg.models.pretrained, "models.pretrained")) / "vae" / "config.json"
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def set_sample_size(unet_dir: Path, sample_size: int) -> None:
    """Say in the UNet config the size it was fine-tuned at, so a pipeline draws at that size by default
    (the SDXL base UNet's 128 means 1024 px; the pre-finetuned one was trained at 512)."""
    path = unet_dir / "config.json"
    config = json.loads(path.read_text())
    config["sample_size"] = sample_size
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _complete_evaluation(cfg: ComatConfig, store: ArtifactStore):
    if "evaluate" not in cfg.stage_order():
        return None
    try:
        key = compute_key(cfg, store, "evaluate")
    except StorageError:
        return None
    return store.reader("evaluate", key) if store.is_complete("evaluate", key) else None


def model_card(cfg: ComatConfig, train: dict, prompts: dict, report: Path | None, with_unet: bool,
               folder: Path | str = ".") -> str:
    """A Hugging Face model card: YAML header, how to load, settings, data, evaluation."""
    base = cfg.models.pretrained
    header = {"library_name": "diffusers", "pipeline_tag": "text-to-image",
              "tags": ["lora", "comat", "text-to-image", "diffusers"]}
    if not base.startswith(("tiny://", "world://", "/", ".", "~")) and base.count("/") == 1:
        header["base_model"] = base  # a Hub id; a local folder would be meaningless to readers
    here = str(folder)
    load = diffusers_lines(cfg, f"{here}/base" if builds_base(cfg) else base, here,
                           f"{here}/unet" if with_unet else None)
    warning = _report_caveat(report) or (
        "A LoRA for a random tiny model, built only to test that the pipeline runs." if base.startswith("tiny://") else None)
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
        *([f"> **{warning}**", ""] if warning else []),
        "## Use", "", f"`{here}` is this folder; once uploaded, the LoRA loads from the Hub repository's id "
        "the same way.", "", "```python", *load, "```", "",
    ]
    if with_unet:
        lines += [f"The LoRA was trained on the {cfg.train.resolution}-px fine-tuned SDXL UNet in `unet/`; load both "
                  f"and draw at {cfg.train.resolution} px.", ""]
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


def _report_caveat(report: Path | None) -> str | None:
    """The evaluation's own warning that its numbers carry no meaning (tiny models, too few pairs)."""
    if report is None or not (report.parent / "summary.json").is_file():
        return None
    from comat_core.stages.evaluate.report import caveat

    return caveat(json.loads((report.parent / "summary.json").read_text()))
