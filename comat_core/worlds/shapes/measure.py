"""Measure a built world: the base model by the judge, per prompt category, and the world's gates.

``measure_world(world_dir, config)`` generates ``probe_seeds`` images per evaluation prompt with the
evaluation sampler (``probe_steps`` steps, guidance ``probe_guidance``, one seeded CPU generator per
image) and judges them. Per category (``single``, ``two`` = held-out two objects, ``new``, ``three``,
``relation``) it records exact binding, colours and shapes right (each apart, so a gain in one is
visible when the other caps binding), shape recall, recall, validity and the judge's failure
taxonomy. ``gates`` are what the world must meet to be worth measuring CoMat on (``GATES``):

* ``single_accuracy`` / ``single_validity``: single objects drawn right (colour and shape), clean;
* ``two_object_shape_recall``: held-out two-object prompts, both named shapes drawn (colour ignored);
* ``heldout_binding``: held-out two-object exact binding, in the band of SD1.5 and SDXL;
* ``captioner_binding_on_base``: the captioner prefers the true caption to the colour-swapped one on
  base images the judge reads as two clean objects (it can teach what the base gets wrong);
* ``vae_two_object_binding``: VAE reconstructions of two-object renders, bound exactly (the codec
  does not cap binding).

``python -m comat_core.worlds.shapes.measure WORLD_DIR`` measures a built world again and rewrites
its ``world.json`` metrics (training metrics kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from comat_core.worlds.shapes import judge
from comat_core.worlds.shapes.render import IMAGE_SIZE, caption, render, sample_scene
from comat_core.worlds.shapes.splits import all_pairs, prompt_split

Progress = Callable[[str, int, int, dict], None]
# gate -> (low, high): the measured fraction must lie in [low, high]
GATES = {
    "single_accuracy": (0.90, 1.0),
    "single_validity": (0.97, 1.0),
    "two_object_shape_recall": (0.80, 1.0),
    "heldout_binding": (0.30, 0.55),
    "captioner_binding_on_base": (0.90, 1.0),
    "vae_two_object_binding": (0.95, 1.0),
}
PROBE_SEED = 10_000  # image k of a prompt is drawn with seed PROBE_SEED + k
VAE_PROBE_SEED = 4242


def _quiet(*_args) -> None:
    return None


def load_base(path: Path):
    """The saved base pipeline (frozen, CPU)."""
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


def judge_category(images: np.ndarray, prompts: list[str]) -> dict:
    """The judge's figures for images against their prompts (means over images) and the failure taxonomy."""
    verdicts = [judge.score(image, prompt) for image, prompt in zip(images, prompts)]
    kinds = [judge.failure(v) for v in verdicts]
    return {
        "n": len(verdicts),
        "binding": float(np.mean([v.binding for v in verdicts])),
        "colours": float(np.mean([judge.colours_right(v) for v in verdicts])),
        "shapes": float(np.mean([judge.shapes_right(v) for v in verdicts])),
        "shape_recall": float(np.mean([judge.shape_recall(v) for v in verdicts])),
        "recall": float(np.mean([v.recall for v in verdicts])),
        "validity": float(np.mean([v.validity for v in verdicts])),
        "taxonomy": {kind: kinds.count(kind) / len(kinds) for kind in judge.FAILURES},
    }


def category_prompts(seed: int, n_eval: int) -> dict[str, list[str]]:
    """The evaluation prompts of each category of the world's split."""
    split = prompt_split(seed, n_eval)
    return {"single": list(split.eval_single), "two": list(split.eval_two), "new": list(split.eval_new),
            "three": list(split.eval_three), "relation": list(split.eval_relation)}


def vae_two_object_binding(vae, n: int, seed: int = VAE_PROBE_SEED) -> float:
    """Exact binding, by the judge, of the VAE's reconstructions of ``n`` two-object renders of two
    different pairs (every pair equally likely)."""
    from comat_core.worlds.shapes.base_model import reconstruct

    rng = np.random.default_rng(seed)
    pairs = all_pairs()
    images, captions = [], []
    while len(images) < n:
        i, j = rng.choice(len(pairs), size=2, replace=False)
        scene = sample_scene(rng, [pairs[i], pairs[j]])
        images.append(render(scene)[0])
        captions.append(caption(scene))
    recon = reconstruct(vae, np.stack(images))
    return float(np.mean([judge.score(im, c).binding for im, c in zip(recon, captions)]))


def gate_report(gates: dict[str, float | None]) -> dict[str, bool]:
    """Whether each measured gate lies in its band (``GATES``); a gate that could not be measured fails."""
    return {name: value is not None and GATES[name][0] <= value <= GATES[name][1] for name, value in gates.items()}


def measure_world(world_dir: Path, config, progress: Progress = _quiet) -> dict:
    """The base model's figures per category and the world's gates (see the module docstring)."""
    from comat_core.worlds.shapes.captioner import binding_on_images, load_for_probe

    world_dir = Path(world_dir)
    pipe = load_base(world_dir / "base")
    result, two_images = {}, None
    for name, prompts in category_prompts(config.seed, config.n_eval_prompts).items():
        expanded = [p for p in prompts for _ in range(config.probe_seeds)]
        seeds = [PROBE_SEED + k for _ in prompts for k in range(config.probe_seeds)]
        images = generate(pipe, expanded, seeds, config.probe_steps, config.probe_guidance)
        result[name] = judge_category(images, expanded)
        two_images = images if name == "two" else two_images
        progress("measure", len(result), 5, {name: round(result[name]["binding"], 3)})
    model, processor = load_for_probe(world_dir / "captioner")
    gates = {
        "single_accuracy": result["single"]["binding"],
        "single_validity": result["single"]["validity"],
        "two_object_shape_recall": result["two"]["shape_recall"],
        "heldout_binding": result["two"]["binding"],
        "captioner_binding_on_base": binding_on_images(model, processor, two_images),
        "vae_two_object_binding": vae_two_object_binding(pipe.vae, config.captioner_probe),
    }
    return {"base": result, "gates": gates, "gates_met": gate_report(gates)}


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


def base_grid(base_dir: Path, config, n: int = 8):
    """The first ``n`` single-object and held-out two-object prompts, one image each (seed PROBE_SEED), labelled."""
    prompts_by = category_prompts(config.seed, config.n_eval_prompts)
    prompts = prompts_by["single"][:n] + prompts_by["two"][:n]
    images = generate(load_base(base_dir), prompts, [PROBE_SEED] * len(prompts), config.probe_steps,
                      config.probe_guidance)
    return labelled_grid(images, prompts, columns=n)


def main(argv: list[str] | None = None) -> None:
    """``python -m comat_core.worlds.shapes.measure WORLD_DIR``: measure a built world again, rewrite its world.json."""
    import argparse

    from comat_core.worlds.shapes.settings import WorldConfig

    parser = argparse.ArgumentParser(prog="python -m comat_core.worlds.shapes.measure", description=main.__doc__)
    parser.add_argument("world_dir", type=Path)
    parser.add_argument("--grid", action="store_true", help="also write base_grid.png")
    args = parser.parse_args(argv)
    record_path = args.world_dir / "world.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    config = WorldConfig(**record["config"])
    torch.set_num_threads(config.threads)

    def show(phase: str, step: int, total: int, info: dict) -> None:
        print(f"{phase} {step}/{total} {info}", flush=True)

    measured = measure_world(args.world_dir, config, show)
    record["metrics"].update(measured)
    record_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if args.grid:
        base_grid(args.world_dir / "base", config).save(args.world_dir / "base_grid.png")
    print(json.dumps({"gates": measured["gates"], "gates_met": measured["gates_met"]}, indent=1))


if __name__ == "__main__":
    main()
