"""A differentiable verdict for the shapes world: a small classifier of the colour-shape pairs an image shows.

The judge reads an image exactly but not differentiably; the captioner is differentiable but its
gradient stops pointing at the right image long before the image is right
(``benchmarks/shapes_reward_descent.py``). This pilot distils the judge into a small CNN, a second
candidate reward with a gradient: 24 sigmoid outputs, one per colour-shape pair, "the judge finds this
pair in the image". Its reward for a prompt is the binary cross-entropy against the prompt's pairs
(present) and every other pair (absent), so its minimum is what the judge calls right.

Training images, every one labelled by the judge's reading (``judge.segment``; an unrecognised blob
names no pair): renders of 1-3 objects (the captioner's data, every pair equally likely), half of them
the world VAE's reconstructions (soft, as generated images decode), and images the base model draws for
CoMat's training prompts. Checked against the judge on images it never saw: the base model's images of
the held-out two-object prompts (4 seeds each, the world's probe seeds).

    python benchmarks/shapes_verdict_pilot.py OUT [--renders 4096] [--generated-seeds 6] [--steps 3000]

Writes ``OUT/verdict.safetensors`` and ``OUT/verdict.json`` (the check, the training loss, times). Use it
as a reward with ``shapes_reward_descent.py --reward verdict --verdict OUT``, or in training with
``--set train.losses.concept_reward=shapes_verdict --set models.verdict=OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comat_core.worlds.shapes.verdict import PAIRS, RECORD, WEIGHTS, VerdictNet, labels  # noqa: E402


def reading(image: np.ndarray) -> list[tuple[str, str]]:
    """The pairs the judge finds in a uint8 image (recognised objects only)."""
    from comat_core.worlds.shapes.judge import segment

    return [(f.colour, f.shape) for f in segment(image) if f.shape is not None]


def read_set(model: VerdictNet, images: np.ndarray) -> list[set]:
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        probs = torch.cat([model(x[i : i + 128]).sigmoid() for i in range(0, len(x), 128)])
    return [{PAIRS[j] for j in np.flatnonzero(row > 0.5)} for row in probs.numpy()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--renders", type=int, default=4096, help="rendered scenes (half VAE-reconstructed)")
    parser.add_argument("--generated-seeds", type=int, default=6, help="base images per CoMat training prompt")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from comat_core.worlds.shapes import PRETRAINED, judge
    from comat_core.worlds.shapes.base_model import reconstruct
    from comat_core.worlds.shapes.data import captioner_dataset
    from comat_core.worlds.shapes.measure import PROBE_SEED, category_prompts, generate, load_base
    from comat_core.worlds.shapes.vocab import parse_prompt

    start = time.time()
    renders = captioner_dataset(args.renders, args.seed + 500).images
    vae = AutoencoderKL.from_pretrained(PRETRAINED / "base" / "vae").eval()
    soft = np.random.default_rng(args.seed + 501).random(len(renders)) < 0.5
    renders[soft] = reconstruct(vae, renders[soft])
    pipe = load_base(PRETRAINED / "base")
    train_prompts = (ROOT / "comat_core" / "data" / "shapes" / "train.txt").read_text().split("\n")
    train_prompts = [p for p in train_prompts if p.strip()]
    expanded = [p for p in train_prompts for _ in range(args.generated_seeds)]
    seeds = [args.seed * 1000 + k for _ in train_prompts for k in range(args.generated_seeds)]
    generated = generate(pipe, expanded, seeds, 25, 7.5)
    images = np.concatenate([renders, generated])
    targets = labels([reading(im) for im in images])
    data_seconds = time.time() - start
    print(f"{len(images)} training images ({len(generated)} generated) in {data_seconds:.0f} s", flush=True)

    torch.manual_seed(args.seed)
    model = VerdictNet(args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    rng = np.random.default_rng(args.seed + 502)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    t0, avg = time.time(), None
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, len(images), args.batch))
        loss = F.binary_cross_entropy_with_logits(model(x_all[idx].float() / 255), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}: loss {avg:.4f}", flush=True)
    model.eval()

    prompts = category_prompts(0, 64)["two"]
    held = generate(pipe, [p for p in prompts for _ in range(4)], [PROBE_SEED + k for _ in prompts for k in range(4)],
                    25, 7.5)
    texts = [p for p in prompts for _ in range(4)]
    judged = [set(reading(im)) for im in held]
    read = read_set(model, held)
    wanted = [set(parse_prompt(t).pairs()) for t in texts]
    judge_binding = np.array([judge.score(im, t).binding for im, t in zip(held, texts)])
    verdict_binding = np.array([r == w for r, w in zip(read, wanted)])
    check = {"images": len(held), "same_reading_as_judge": float(np.mean([r == j for r, j in zip(read, judged)])),
             "binding_verdict_agreement": float(np.mean(judge_binding == verdict_binding)),
             "judge_binding": float(judge_binding.mean()), "verdict_binding": float(verdict_binding.mean())}
    print(json.dumps(check), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), args.out / WEIGHTS)
    record = {"width": args.width, "renders": args.renders, "generated": len(generated), "steps": args.steps,
              "loss": avg, "train_seconds": round(time.time() - t0, 1), "data_seconds": round(data_seconds, 1),
              "check_on_heldout_base_images": check}
    (args.out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
