"""Does CoMat make a model bind attributes better? The shapes world's measurement (run by hand, on a CPU).

Usage (from the repository root; 2 cores, see benchmarks/RESULTS.md for the wall times):
  python benchmarks/shapes_world.py --storage ./comat-artifacts/shapes-bench --out benchmarks/shapes
  python benchmarks/shapes_world.py --variants full --curve-every 25     # the main run and its curve only
  python benchmarks/shapes_world.py --set train.max_steps=100            # any override, for every variant

What it does, all through the pipeline's own stages (cached: a rerun recomputes nothing):

1. ``world`` (the shipped models, or a build), ``prompts``, ``gan_gt``, ``masks`` of the ``shapes`` preset.
2. For each variant (same seeds, same data, same evaluation prompts): ``train`` then ``evaluate``.
   The evaluation prompts are held-out two-object prompts the training never saw (``shapes``), the
   training prompts (``shapes_train``) and single objects (``shapes_single``); each prompt is drawn
   with the same seeds by the base and the tuned model and scored by the judge; the 95 % interval is
   the evaluate stage's paired bootstrap over prompts.
3. The curve of the first variant: each kept checkpoint's LoRA draws the held-out prompts with the
   evaluation seeds, and the judge scores them (binding and validity against training steps).

Variants (ablations of the loss terms and of the method's decisions):
  full          concept activation + attribute concentration + fidelity (GAN); replayed gan_gt noise, offline masks
  concept       concept activation only
  concept+attr  concept activation + attribute concentration (no GAN)
  full+mixed    full, with Mixed Latent (p_mixed 0.3)
  full+online   full, with the reference's noise and masks (fresh noise every step, the online image segmented)
  replay-n4     full, four gan_gt samples (seeds, latents, masks) per prompt instead of one
  fresh-no-attr fresh noise, no attribute concentration (concept activation + GAN)
  rank32-600    full+online, LoRA rank 32 for 600 steps (longer variants live here, not in the preset)
  oracle        the judge oracle alone in place of the captioner (a diagnostic: is the reward or the path at fault?)
  oracle-lr1e-4 the judge oracle alone at lr 1e-4

Writes ``<out>/results.json``, ``<out>/results.md`` (the tables) and ``<out>/curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "full": [],
    "concept": ["train.losses.token_weight=0", "train.losses.pixel_weight=0", "train.losses.gan_weight=0"],
    "concept+attr": ["train.losses.gan_weight=0"],
    "full+mixed": ["train.p_mixed=0.3"],
    "full+online": ["train.noise=fresh", "train.masks=online"],
    "replay-n4": ["gan_gt.samples_per_prompt=4"],
    "fresh-no-attr": ["train.noise=fresh", "train.masks=online", "train.losses.token_weight=0",
                      "train.losses.pixel_weight=0"],
    "rank32-600": ["train.noise=fresh", "train.masks=online", "train.lora.rank=32", "train.lora.alpha=32",
                   "train.max_steps=600"],
    "oracle": ["train.losses.concept_reward=shapes_judge", "train.losses.token_weight=0", "train.losses.pixel_weight=0",
               "train.losses.gan_weight=0"],
}
VARIANTS["oracle-lr1e-4"] = VARIANTS["oracle"] + ["train.learning_rate=1e-4"]
DATA_STAGES = ("world", "prompts", "gan_gt", "masks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", default="./comat-artifacts/shapes-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "shapes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], help="an override for every variant (a.b=c)")
    parser.add_argument("--curve-every", type=int, default=0, help="checkpoint interval for the curve (0: the preset's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from comat_core.config import load_config
    from comat_core.stages.registry import run_stage
    from comat_core.store.storage import ArtifactStore

    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    common = list(args.set)
    if args.curve_every:
        common += [f"train.checkpoint_every={args.curve_every}"]

    def config(variant: str):
        return load_config("shapes", overrides=common + VARIANTS[variant], extra={"storage": {"root": args.storage}})

    store = ArtifactStore(args.storage)
    seconds: dict[str, float] = {}
    first = config(names[0])
    for stage in DATA_STAGES:
        seconds[stage] = _timed(lambda: run_stage(first, store, stage), stage)
    results = {"variants": {}, "seconds": seconds, "device": _device()}
    for name in names:
        cfg = config(name)
        for stage in cfg.stage_order():  # a variant may change the data (gan_gt samples) or drop the masks stage
            if stage in DATA_STAGES:
                run_stage(cfg, store, stage)
        train_s = _timed(lambda: run_stage(cfg, store, "train"), f"{name}: train")
        eval_s = _timed(lambda: run_stage(cfg, store, "evaluate"), f"{name}: evaluate")
        from comat_core.stages.registry import compute_key

        summary = json.loads(store.reader("evaluate", compute_key(cfg, store, "evaluate")).read_bytes("summary.json"))
        results["variants"][name] = {"overrides": VARIANTS[name], "train_seconds": train_s, "evaluate_seconds": eval_s,
                                     "results": summary["results"]}
        write(results, args.out)  # after each variant: a long run's finished part is never lost
        if name == names[0]:
            results["curve"] = curve(cfg, store)
            plot_curve(results["curve"], args.out / "curve.png")
            write(results, args.out)
    print(markdown(results))
    return 0


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))


def _timed(fn, label: str) -> float:
    """Seconds the stage took to compute: measured now, or on a cache hit the time its manifest recorded."""
    t = time.time()
    result = fn()
    spent = round(time.time() - t, 1)
    if getattr(result, "cached", False):
        recorded = round(float((getattr(result, "manifest", None) or {}).get("seconds") or 0.0), 1)
        print(f"{label}: cached in {spent} s (computed in {recorded} s when it ran)", flush=True)
        return recorded
    print(f"{label}: computed in {spent} s", flush=True)
    return spent


def _device() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------
# The curve: judge the held-out prompts with each checkpoint's LoRA


def curve(cfg, store) -> list[dict]:
    import torch
    from safetensors.torch import load

    from comat_core.models.generation import draw, load_generator
    from comat_core.models.lora import add_lora, load_lora_state_dict
    from comat_core.stages.evaluate.prompt_sets import load_eval_prompts
    from comat_core.stages.evaluate.shapes import verdicts
    from comat_core.stages.registry import compute_key, stage_inputs, with_world_models
    from comat_core.store.checkpoint import committed_checkpoints
    from comat_core.store.full_state import GENERATOR

    inputs = {n: store.reader(n, compute_key(cfg, store, n)) for n in stage_inputs(cfg, "train")}
    run_cfg = with_world_models(cfg, inputs)
    writer = store.writer("train", compute_key(cfg, store, "train"))
    ev = cfg.evaluate
    prompts = load_eval_prompts(ev).categories["shapes"]
    texts = [p for p in prompts for _ in range(ev.images_per_prompt)]
    seeds = [ev.seed + k for _ in prompts for k in range(ev.images_per_prompt)]
    pipe = load_generator(run_cfg, torch.device("cpu"))
    add_lora(pipe.unet, cfg.train.lora.rank, cfg.train.lora.alpha, cfg.train.lora.target_modules)
    points = []
    for step, state in [(0, None)] + [(c.step, c) for c in committed_checkpoints(writer)]:
        if state is not None:
            load_lora_state_dict(pipe.unet, load(store.read_bytes(writer.path(f"{state.folder}/{GENERATOR}"))))
        images = []
        for i in range(0, len(texts), ev.batch_size):
            images += draw(pipe, texts[i : i + ev.batch_size], seeds[i : i + ev.batch_size], resolution=ev.resolution,
                           num_inference_steps=ev.num_inference_steps, guidance_scale=ev.guidance_scale)
        found = verdicts(images, texts)
        points.append({"step": step, "binding": sum(v.binding for v in found) / len(found),
                       "validity": sum(v.validity for v in found) / len(found)})
        print(f"curve: step {step}: binding {points[-1]['binding']:.3f} validity {points[-1]['validity']:.3f}", flush=True)
    return points


def plot_curve(points: list[dict], path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height, pad = 480, 240, 36
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [p["step"] for p in points] or [0]
    top = max(steps) or 1

    def xy(step: float, value: float) -> tuple[float, float]:
        return pad + (width - 2 * pad) * step / top, height - pad - (height - 2 * pad) * value

    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for key, colour in (("binding", (200, 30, 30)), ("validity", (30, 60, 200))):
        line = [xy(p["step"], p[key]) for p in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    draw.text((pad, 8), "held-out binding accuracy (red) and validity (blue) vs training step", fill="black")
    draw.text((pad, height - pad + 6), f"0 ... {top} steps; y from 0 to 1", fill="black")
    image.save(path)


# ----------------------------------------------------------------------------------------------
# Tables


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device']}", "",
             "| variant | category | binding base | binding tuned | Δ binding | 95% CI of Δ | recall base → tuned "
             "(Δ, 95% CI) | validity base → tuned | prompts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["variants"].items():
        for category, data in entry["results"].items():
            m = data["metrics"].get("shapes")
            r = data["metrics"].get("shapes.recall", {})
            v = data["metrics"].get("shapes.validity", {})
            if not m:
                continue
            ci = m.get("ci95") or [float("nan")] * 2
            rci = r.get("ci95") or [float("nan")] * 2
            lines.append(f"| {name} | {category} | {m['base']:.3f} | {m['tuned']:.3f} | {m['delta']:+.3f} "
                         f"| [{ci[0]:+.3f}, {ci[1]:+.3f}] | {r.get('base', float('nan')):.3f} → "
                         f"{r.get('tuned', float('nan')):.3f} ({r.get('delta', float('nan')):+.3f}, "
                         f"[{rci[0]:+.3f}, {rci[1]:+.3f}]) | {v.get('base', float('nan')):.3f} → "
                         f"{v.get('tuned', float('nan')):.3f} | {m['n_prompts']} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {s} |" for stage, s in results["seconds"].items()]
    lines += [f"| {name}: train / evaluate | {e['train_seconds']} / {e['evaluate_seconds']} |"
              for name, e in results["variants"].items()]
    if results.get("curve"):
        lines += ["", "| step | held-out binding | validity |", "|---|---|---|"]
        lines += [f"| {p['step']} | {p['binding']:.3f} | {p['validity']:.3f} |" for p in results["curve"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
