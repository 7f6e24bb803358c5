"""Build the shapes world: render the datasets, train the base model and the captioner, measure them.

``build_world(config, out_dir, progress)`` writes::

    out_dir/base/         a StableDiffusionPipeline folder (load_sd_pipeline, family sd15)
    out_dir/captioner/    a BlipForConditionalGeneration + BlipProcessor folder (load_captioner)
    out_dir/world.json    vocabulary, pair kinds, prompt split, seeds, config, metrics, wall times

Each part is seeded on its own (``seed`` + a fixed offset per part) and trained with
``config.threads`` torch threads, so a part's weights depend only on the config, the code and the
torch build. The VAE is a generic image codec and is trained on renders of every pair; the
text-conditional UNet and text encoder see only the base model's skewed captions (``splits``).

``python -m comat_core.worlds.shapes.build OUT_DIR`` also writes ``base_grid.png`` (``base_grid``):
base images labelled with the judge's verdicts.

``WorldConfig`` holds every size, step count and seed; ``WorldConfig.smoke()`` is a build of about a
minute for CI (it checks that everything runs, not how good the models are).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from comat_core.worlds.shapes import base_model, captioner, judge
from comat_core.worlds.shapes.data import base_dataset, captioner_dataset
from comat_core.worlds.shapes.render import IMAGE_SIZE
from comat_core.worlds.shapes.splits import RARE_WEIGHT, all_pairs, pair_kind, prompt_split
from comat_core.worlds.shapes.vocab import BACKGROUND, COLOURS, RELATIONS, SHAPES, SIZES, parse_prompt

WORLD_VERSION = 2  # bump when the world's rendering or recipe changes meaning

Progress = Callable[[str, int, int, dict], None]


class WorldConfig(BaseModel):
    """Sizes, steps and seeds of a world build (defaults: the full build, about 30 min on 2 shared cores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    threads: int = Field(1, ge=1, description="torch threads while training (part of what makes weights reproducible)")
    # VAE (trained first, on renders of every pair)
    vae_images: int = Field(4000, ge=16)
    vae_steps: int = Field(1200, ge=1)
    vae_batch: int = Field(16, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    # UNet + text encoder (latent diffusion on the base model's skewed captions)
    base_images: int = Field(24000, ge=16)
    base_object_counts: tuple[float, float, float] = Field(
        (0.3, 0.55, 0.15), description="share of 1-, 2- and 3-object scenes in the base model's data (version 1: "
        "0.4/0.45/0.15 and 8,000 images for 2,400 steps drew two clean objects for a fifth of two-object prompts)")
    unet_steps: int = Field(3200, ge=1)
    unet_batch: int = Field(64, ge=1)
    unet_lr: float = Field(1e-3, gt=0)
    unet_widths: tuple[int, int] = (32, 64)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # captioner (uniform over all pairs)
    captioner_images: int = Field(8000, ge=16)
    captioner_steps: int = Field(3000, ge=1)
    captioner_batch: int = Field(32, ge=1)
    captioner_lr: float = Field(1e-3, gt=0)
    captioner_hidden: int = Field(64, ge=8)
    captioner_layers: int = Field(2, ge=1)
    # prompts and measurement
    n_eval_prompts: int = Field(64, ge=1, description="held-out two-object evaluation prompts")
    probe_seeds: int = Field(4, ge=1, description="images per prompt when measuring the base model")
    probe_steps: int = Field(25, ge=1, description="sampling steps when measuring the base model")
    probe_guidance: float = Field(7.5, ge=0)
    captioner_probe: int = Field(400, ge=10, description="two-object renders for the captioner's binding")

    @field_validator("base_object_counts")
    @classmethod
    def _shares(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or sum(value) <= 0:
            raise ValueError("shares of 1-, 2- and 3-object scenes must be >= 0 with a positive sum")
        return value

    @classmethod
    def smoke(cls, **overrides) -> "WorldConfig":
        """A tiny build for CI: every part runs, nothing is expected to be good."""
        values = dict(vae_images=64, vae_steps=3, vae_batch=8, base_images=64, unet_steps=3, unet_batch=8,
                      captioner_images=64, captioner_steps=3, captioner_batch=8, n_eval_prompts=4, probe_seeds=1,
                      probe_steps=2, captioner_probe=10)
        return cls(**{**values, **overrides})


def _quiet(*_args) -> None:
    return None


def build_world(config: WorldConfig, out_dir: Path, progress: Progress = _quiet) -> dict:
    """Build the world into ``out_dir`` (see the module docstring); returns what ``world.json`` holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            metrics, times = _build(config, out_dir, progress)
    finally:
        torch.set_num_threads(threads)
    world = world_record(config, metrics, times)
    (out_dir / "world.json").write_text(json.dumps(world, indent=1) + "\n")
    return world


def world_record(config: WorldConfig, metrics: dict, times: dict) -> dict:
    """What ``world.json`` holds: the world's definition, its config, and what was measured."""
    split = prompt_split(config.seed, config.n_eval_prompts)
    return {
        "version": WORLD_VERSION,
        "image_size": IMAGE_SIZE,
        "vocabulary": {"colours": {k: list(v) for k, v in COLOURS.items()}, "background": list(BACKGROUND),
                       "shapes": list(SHAPES), "sizes": list(SIZES), "relations": list(RELATIONS)},
        "pair_kinds": {f"{c} {s}": pair_kind((c, s)) for c, s in all_pairs()},
        "rare_weight": RARE_WEIGHT,
        "prompts": {"train": list(split.train), "eval_two": list(split.eval_two),
                    "eval_single": list(split.eval_single)},
        "config": config.model_dump(mode="json"),
        "metrics": metrics,
        "seconds": times,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def _build(config: WorldConfig, out_dir: Path, progress: Progress) -> tuple[dict, dict]:
    times, metrics = {}, {}
    clock = time.time()
    vae = train_vae_part(config, metrics, progress)
    times["vae"], clock = time.time() - clock, time.time()
    train_base_part(config, vae, out_dir / "base", metrics, progress)
    times["base"], clock = time.time() - clock, time.time()
    train_captioner_part(config, out_dir / "captioner", metrics, progress)
    times["captioner"], clock = time.time() - clock, time.time()
    metrics["base"] = measure_base(out_dir / "base", config, progress)
    times["measure"] = time.time() - clock
    return metrics, times


def train_vae_part(config: WorldConfig, metrics: dict, progress: Progress = _quiet):
    """Part 1: the VAE, on renders of every pair (seeds ``seed``)."""
    data = captioner_dataset(config.vae_images, config.seed)
    vae = base_model.build_vae(config.seed)
    metrics.update(base_model.train_vae(vae, data.images, steps=config.vae_steps, batch_size=config.vae_batch,
                                        lr=config.vae_lr, seed=config.seed, progress=progress))
    return vae


def train_base_part(config: WorldConfig, vae, out_dir: Path, metrics: dict, progress: Progress = _quiet) -> Path:
    """Part 2: latent diffusion on the base model's skewed captions (seeds ``seed + 200..203``); saves the pipeline."""
    seed = config.seed
    data = base_dataset(config.base_images, seed + 200, config.base_object_counts)
    latents = base_model.encode(vae, data.images)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    tokenizer = base_model.build_clip_tokenizer()
    unet = base_model.build_unet(seed + 201, tuple(config.unet_widths))
    text_encoder = base_model.build_text_encoder(tokenizer, seed + 202)
    unet, text_encoder, unet_metrics = base_model.train_unet(
        unet, text_encoder, tokenizer, latents * scale, data.captions, steps=config.unet_steps,
        batch_size=config.unet_batch, lr=config.unet_lr, seed=seed + 203, ema_decay=config.ema_decay,
        progress=progress)
    metrics.update(unet_metrics, vae_scaling_factor=scale)
    return base_model.save_pipeline(out_dir, vae, text_encoder, tokenizer, unet)


def train_captioner_part(config: WorldConfig, out_dir: Path, metrics: dict, progress: Progress = _quiet) -> Path:
    """Part 3: the captioner, uniform over every pair (seeds ``seed + 300..302``); saves it and its binding."""
    seed = config.seed
    data = captioner_dataset(config.captioner_images, seed + 300)
    model, processor = captioner.build_captioner(seed + 301, config.captioner_hidden, config.captioner_layers)
    metrics.update(captioner.train_captioner(model, processor, data.images, data.captions,
                                             steps=config.captioner_steps, batch_size=config.captioner_batch,
                                             lr=config.captioner_lr, seed=seed + 302, progress=progress))
    metrics["captioner_binding"] = captioner.binding_accuracy(model, processor, n=config.captioner_probe)
    return captioner.save_captioner(out_dir, model, processor)


def load_base(path: Path):
    """The saved base pipeline (frozen, CPU), its scheduler DDPM as CoMat samples with."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 32) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images, one per (prompt, seed), each from its own seeded CPU generator."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        images = pipe(prompt=prompts[i : i + batch], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                      guidance_scale=guidance, generator=gens, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.concatenate(out)


def judge_prompts(images: np.ndarray, prompts: list[str]) -> dict:
    """Binding, recall and validity of images against their prompts, overall and by pair kind.

    A prompt's kind is the rarest kind among its pairs (unseen < rare < seen).
    """
    rank = {"unseen": 0, "rare": 1, "seen": 2}
    rows = []
    for image, prompt in zip(images, prompts):
        verdict = judge.score(image, prompt)
        kind = min((pair_kind(p) for p in parse_prompt(prompt).pairs()), key=rank.__getitem__)
        rows.append((kind, verdict.binding, verdict.recall, verdict.validity))

    def summary(sel):
        if not sel:
            return {"n": 0}
        return {"n": len(sel), "binding": float(np.mean([r[1] for r in sel])),
                "recall": float(np.mean([r[2] for r in sel])), "validity": float(np.mean([r[3] for r in sel]))}

    out = {"all": summary(rows)}
    for kind in rank:
        out[kind] = summary([r for r in rows if r[0] == kind])
    return out


def measure_base(path: Path, config: WorldConfig, progress: Progress = _quiet) -> dict:
    """The base model's binding/recall/validity on single-object prompts and held-out two-object prompts."""
    pipe = load_base(path)
    split = prompt_split(config.seed, config.n_eval_prompts)
    result = {}
    for name, prompts in (("single", list(split.eval_single)), ("two", list(split.eval_two))):
        expanded = [p for p in prompts for _ in range(config.probe_seeds)]
        seeds = [10_000 + k for _ in prompts for k in range(config.probe_seeds)]
        images = generate(pipe, expanded, seeds, config.probe_steps, config.probe_guidance)
        result[name] = judge_prompts(images, expanded)
        progress("measure", 1, 1, {name: result[name]["all"]})
    return result


def labelled_grid(images: np.ndarray, prompts: list[str], columns: int = 8, cell: int = 192):
    """A PIL grid of images, each labelled with its prompt and the judge's verdict (green: bound)."""
    from PIL import Image, ImageDraw

    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * cell, rows * (cell + 44)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, prompt) in enumerate(zip(images, prompts)):
        verdict = judge.score(image, prompt)
        x, y = (k % columns) * cell, (k // columns) * (cell + 44)
        canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 2), prompt.replace(" and ", " &\n"), fill="black")
        draw.text((x + 2, y + cell + 26), verdict.summary()[:34], fill="green" if verdict.binding else "red")
    return canvas


def base_grid(base_dir: Path, config: WorldConfig, n: int = 8):
    """The first ``n`` single-object and held-out two-object prompts, one image each (seed 10000), labelled."""
    split = prompt_split(config.seed, config.n_eval_prompts)
    prompts = list(split.eval_single[:n]) + list(split.eval_two[:n])
    images = generate(load_base(base_dir), prompts, [10_000] * len(prompts), config.probe_steps,
                      config.probe_guidance)
    return labelled_grid(images, prompts, columns=n)


def main(argv: list[str] | None = None) -> None:
    """``python -m comat_core.worlds.shapes.build OUT_DIR [--smoke] [--seed N]``: build a world by hand."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m comat_core.worlds.shapes.build", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the CI-sized build (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = WorldConfig.smoke(seed=args.seed) if args.smoke else WorldConfig(seed=args.seed)

    def show(phase: str, step: int, total: int, info: dict) -> None:
        print(f"{phase} {step}/{total} {info}", flush=True)

    world = build_world(config, args.out_dir, show)
    base_grid(args.out_dir / "base", config).save(args.out_dir / "base_grid.png")
    print(json.dumps({"metrics": world["metrics"], "seconds": world["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
