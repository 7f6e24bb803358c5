"""Build the shapes world: render the datasets, train the base model and the captioner, measure them.

``build_world(config, out_dir, progress)`` writes::

    out_dir/base/         a StableDiffusionPipeline folder (load_sd_pipeline, family sd15)
    out_dir/captioner/    a BlipForConditionalGeneration + BlipProcessor folder (load_captioner)
    out_dir/world.json    vocabulary, pair kinds, prompt split, seeds, config, metrics, wall times

Each part is seeded on its own (``seed`` + a fixed offset per part) and trained with
``config.threads`` torch threads, so a part's weights depend only on the config, the code and the
torch build. The VAE is a generic image codec and is trained on renders of every pair; the
text-conditional UNet and text encoder see only the base model's captions (pairs by
``pair_design``, loose with ``swap_p``: ``data``, ``splits``). ``measure`` judges the built base model
per prompt category and records the world's gates in ``metrics.gates``.

``python -m comat_core.worlds.shapes.build OUT_DIR`` also writes ``base_grid.png`` (``base_grid``):
base images labelled with the judge's verdicts.

``WorldConfig`` (``settings``) holds every size, step count and seed; ``WorldConfig.smoke()`` is a
build of about a minute for CI (it checks that everything runs, not how good the models are).
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from comat_core.worlds.shapes import base_model, captioner
from comat_core.worlds.shapes.data import base_dataset, captioner_dataset
from comat_core.worlds.shapes.measure import base_grid, measure_world
from comat_core.worlds.shapes.render import IMAGE_SIZE
from comat_core.worlds.shapes.settings import WORLD_VERSION, WorldConfig
from comat_core.worlds.shapes.splits import RARE_WEIGHT, all_pairs, pair_kind, prompt_split
from comat_core.worlds.shapes.vocab import BACKGROUND, COLOURS, RELATIONS, SHAPES, SIZES

Progress = Callable[[str, int, int, dict], None]


def _quiet(*_args) -> None:
    return None


def build_world(config: WorldConfig, out_dir: Path, progress: Progress = _quiet) -> dict:
    """Build the world into ``out_dir`` (see the module docstring); returns what ``world.json`` holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _pinned(config):
        metrics, times = _build(config, out_dir, progress)
    return write_record(config, out_dir, metrics, times)


@contextmanager
def _pinned(config: WorldConfig):
    """``config.threads`` torch threads and a forked RNG while a world trains (part of what makes it reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def write_record(config: WorldConfig, out_dir: Path, metrics: dict, times: dict) -> dict:
    """Write ``out_dir/world.json`` (``world_record``) and return what it holds."""
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
        "pair_kinds": {f"{c} {s}": pair_kind((c, s), config.pair_design) for c, s in all_pairs()},
        "rare_weight": RARE_WEIGHT if config.pair_design == "latin" else None,
        "prompts": {"train": list(split.train), "eval_two": list(split.eval_two), "eval_new": list(split.eval_new),
                    "eval_three": list(split.eval_three), "eval_relation": list(split.eval_relation),
                    "eval_single": list(split.eval_single), "new_pairs": [" ".join(p) for p in split.new_pairs]},
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
    metrics.update(measure_world(out_dir, config, progress))
    times["measure"] = time.time() - clock
    return metrics, times


def train_vae_part(config: WorldConfig, metrics: dict, progress: Progress = _quiet):
    """Part 1: the VAE, on renders of every pair (seeds ``seed``)."""
    data = captioner_dataset(config.vae_images, config.seed, config.size_ranges)
    vae = base_model.build_vae(config.seed, tuple(config.vae_widths))
    metrics.update(base_model.train_vae(vae, data.images, steps=config.vae_steps, batch_size=config.vae_batch,
                                        lr=config.vae_lr, seed=config.seed, progress=progress))
    return vae


def train_base_part(config: WorldConfig, vae, out_dir: Path, metrics: dict, progress: Progress = _quiet) -> Path:
    """Part 2: latent diffusion on the base model's captions (seeds ``seed + 200..204``); saves the pipeline.

    Phase ``unet`` trains the UNet and the text encoder together; with ``freeze_text_after`` set it
    stops there and phase ``unet_frozen_text`` goes on from the EMA weights with the text encoder frozen.
    With ``refine_steps`` set, phase ``unet_refine`` (``refine_phase``) goes on from there.
    """
    seed = config.seed
    data = base_dataset(config.base_images, seed + 200, config.base_object_counts, design=config.pair_design,
                        swap_p=config.swap_p, size_ranges=config.size_ranges)
    latents = base_model.encode(vae, data.images)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    tokenizer = base_model.build_clip_tokenizer()
    unet = base_model.build_unet(seed + 201, tuple(config.unet_widths), config.latent_size)
    text_encoder = base_model.build_text_encoder(tokenizer, seed + 202)
    joint = config.unet_steps if config.freeze_text_after is None else config.freeze_text_after
    common = dict(batch_size=config.unet_batch, lr=config.unet_lr, ema_decay=config.ema_decay, progress=progress)
    if joint:
        unet, text_encoder, unet_metrics = base_model.train_unet(
            unet, text_encoder, tokenizer, latents * scale, data.captions, steps=joint, seed=seed + 203, **common)
        metrics.update(unet_metrics)
    if config.unet_steps > joint:
        unet, text_encoder, frozen_metrics = base_model.train_unet(
            unet, text_encoder, tokenizer, latents * scale, data.captions, steps=config.unet_steps - joint,
            seed=seed + 204, train_text=False, phase="unet_frozen_text", **common)
        metrics.update(frozen_metrics)
    if config.refine_steps:
        unet, text_encoder = refine_phase(config, unet, text_encoder, tokenizer, latents * scale, data.captions,
                                          metrics, progress)
    loose = 0 if data.exact is None else sum(a != b for a, b in zip(data.captions, data.exact))
    metrics.update(vae_scaling_factor=scale, loose_captions=loose / len(data.captions))
    return base_model.save_pipeline(out_dir, vae, text_encoder, tokenizer, unet)


def refine_phase(config: WorldConfig, unet, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str],
                 metrics: dict, progress: Progress = _quiet):
    """Phase 3, ``unet_refine`` (seed ``seed + 205``): ``refine_steps`` more denoising steps from the EMA
    weights of the phases before, at ``refine_lr`` with a fresh one-cycle schedule; the text encoder
    trains only with ``refine_text``. Returns the EMA ``(unet, text_encoder)``."""
    unet, text_encoder, refine_metrics = base_model.train_unet(
        unet, text_encoder, tokenizer, latents, captions, steps=config.refine_steps, batch_size=config.unet_batch,
        lr=config.refine_lr, ema_decay=config.ema_decay, seed=config.seed + 205, train_text=config.refine_text,
        phase="unet_refine", progress=progress)
    metrics.update(refine_metrics)
    return unet, text_encoder


def refine_saved_world(config: WorldConfig, source: Path, out_dir: Path, progress: Progress = _quiet) -> dict:
    """Phase 3 alone on a saved world built with ``config`` less its refinement: renders the same base
    data, encodes it with the saved VAE (the latents and scale the build had), refines the saved base,
    copies the captioner, measures, and writes ``out_dir/world.json``. Equal to building ``config``
    from scratch (same torch build and threads), at the cost of phase 3 and the measurement alone."""
    import shutil

    from comat_core.worlds.shapes.measure import load_base

    source, out_dir = Path(source), Path(out_dir)
    record = json.loads((source / "world.json").read_text(encoding="utf-8"))
    refinement = ("refine_steps", "refine_lr", "refine_text")
    expected = {k: v for k, v in config.model_dump(mode="json").items() if k not in refinement}
    built = {**expected, **{k: v for k, v in record["config"].items() if k in expected}}
    if record["config"].get("refine_steps"):
        raise ValueError(f"{source} is refined already: refine only a world built without phase 3")
    if built != expected:
        changed = sorted(k for k in expected if built[k] != expected[k])
        raise ValueError(f"{source} was built with other settings than the config less its refinement: {changed}")
    with _pinned(config):
        clock = time.time()
        pipe = load_base(source / "base")
        data = base_dataset(config.base_images, config.seed + 200, config.base_object_counts,
                            design=config.pair_design, swap_p=config.swap_p, size_ranges=config.size_ranges)
        latents = base_model.encode(pipe.vae, data.images) * pipe.vae.config.scaling_factor
        metrics = {k: v for k, v in record["metrics"].items() if k not in ("base", "gates", "gates_met")}
        unet, text_encoder = refine_phase(config, pipe.unet, pipe.text_encoder, pipe.tokenizer, latents,
                                          data.captions, metrics, progress)
        base_model.save_pipeline(out_dir / "base", pipe.vae, text_encoder, pipe.tokenizer, unet)
        shutil.copytree(source / "captioner", out_dir / "captioner", dirs_exist_ok=True)
        times = {**record["seconds"], "refine": time.time() - clock}
        clock = time.time()
        metrics.update(measure_world(out_dir, config, progress))
        times["measure"] = time.time() - clock
    return write_record(config, out_dir, metrics, times)


def train_captioner_part(config: WorldConfig, out_dir: Path, metrics: dict, progress: Progress = _quiet) -> Path:
    """Part 3: the captioner, uniform over every pair (seeds ``seed + 300..302``); saves it and its binding."""
    seed = config.seed
    data = captioner_dataset(config.captioner_images, seed + 300, config.size_ranges)
    model, processor = captioner.build_captioner(seed + 301, config.captioner_hidden, config.captioner_layers)
    metrics.update(captioner.train_captioner(model, processor, data.images, data.captions,
                                             steps=config.captioner_steps, batch_size=config.captioner_batch,
                                             lr=config.captioner_lr, seed=seed + 302, progress=progress))
    metrics["captioner_binding"] = captioner.binding_accuracy(model, processor, n=config.captioner_probe)
    return captioner.save_captioner(out_dir, model, processor)


def main(argv: list[str] | None = None) -> None:
    """``python -m comat_core.worlds.shapes.build OUT_DIR [--smoke] [--seed N] [--set KEY=VALUE ...]``: build a
    world by hand (``--set`` takes any ``WorldConfig`` field; values are JSON, e.g. ``--set swap_p=0.4``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m comat_core.worlds.shapes.build", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the CI-sized build (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refine-from", type=Path, metavar="WORLD_DIR",
                        help="run phase 3 (refine_steps > 0) alone on WORLD_DIR, a world built with the same "
                             "settings less the refinement, instead of building from scratch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a WorldConfig field (value as JSON; a bare word is a string)")
    args = parser.parse_args(argv)
    overrides = dict(seed=args.seed)
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    config = WorldConfig.smoke(**overrides) if args.smoke else WorldConfig(**overrides)

    def show(phase: str, step: int, total: int, info: dict) -> None:
        print(f"{phase} {step}/{total} {info}", flush=True)

    if args.refine_from is not None:
        if not config.refine_steps:
            parser.error("--refine-from needs --set refine_steps=N with N > 0")
        world = refine_saved_world(config, args.refine_from, args.out_dir, show)
    else:
        world = build_world(config, args.out_dir, show)
    base_grid(args.out_dir / "base", config).save(args.out_dir / "base_grid.png")
    print(json.dumps({"metrics": world["metrics"], "seconds": world["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
