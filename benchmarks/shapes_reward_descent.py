"""Does the captioner's gradient fix what the base draws wrong? Descend CoMat's reward one image at a time.

CoMat trains a LoRA so that the captioner's loss of the prompt falls on the images the UNet draws.
On the shapes world it lowers that loss without raising exact binding (``benchmarks/RESULTS.md`` §9).
This probe asks, before any LoRA, whether the reward's gradient points at binding at all, by following
it on one image at a time (held-out two-object prompts, one image per prompt from the base model, no
weights changed) at three depths of the generator:

* ``pixels``: the image itself (each pixel a parameter, kept in [0, 1]);
* ``latent``: the clean latent the sampler ends in, decoded by the frozen VAE: only images the
  decoder can draw;
* ``noise``: the initial noise, through the whole frozen sampler (every step under autograd, the
  same variance noise at every iteration) and the decoder: only images the base UNet draws.

At each depth Adam lowers the captioner's loss (the training's concept activation, its random crop
included) for ``--iters`` iterations; the judge reads the image at the checkpoints. Two targets:
``prompt`` (what CoMat does: does a wrong image become right, a right one stay right?) and
``swap`` (a control: the prompt with its two colours exchanged, from images of the prompt, for the
prompts whose two objects differ in shape; does the gradient steer the image to what the captioner is
asked for?). A reward whose gradient is a binding gradient turns wrong images right and keeps right
ones at every depth it can descend; one that lowers its loss while the judge's verdicts stay (or
churn) is satisfied by changes the judge does not count. (Measured: the noise depth cannot be
descended at these step sizes, by any reward; ``benchmarks/RESULTS.md`` §9.)

Rewards (``--reward``): the world's captioner (or ``--captioner DIR``), the judge oracle's pixel target
(right at its minimum), or a verdict classifier distilled from the judge (``--verdict DIR``, from
``benchmarks/shapes_verdict_pilot.py``).

Usage::

    python benchmarks/shapes_reward_descent.py [--depths pixels,latent,noise] [--targets prompt,swap]
        [--prompts 32] [--iters 40] [--reward captioner|judge|verdict] [--grid DIR] [--out F.json]

One CPU thread: 15-45 seconds a run (depth and target) at the pixel and latent depths with 64 prompts
and 40 iterations; 8-10 minutes at the noise depth with 32 prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEPTHS = ("pixels", "latent", "noise")
TARGETS = ("prompt", "swap")
LEARNING_RATES = {"pixels": 0.01, "latent": 0.05, "noise": 0.05}  # Adam; pixels in [0, 1], latents ~unit scale
SEED = 10_000  # the world's probe seed: image k of a prompt is drawn with seed SEED + k


def swapped(prompt: str) -> str | None:
    """The prompt with its two objects' colours exchanged (``a red circle and a blue square`` -> ``a blue
    circle and a red square``); None when both objects have one shape (the swap is the same scene)."""
    from comat_core.worlds.shapes.splits import two_object_prompt
    from comat_core.worlds.shapes.vocab import parse_prompt

    (c1, s1), (c2, s2) = parse_prompt(prompt).pairs()
    return two_object_prompt((c2, s1), (c1, s2)) if s1 != s2 else None


class FrozenSampler:
    """The evaluation sampler (DDPM, v-prediction, classifier-free guidance) as a differentiable function
    of the initial noise, with the variance noise of every step drawn once from each image's seed, in
    the order the diffusers pipeline draws it. The posterior step is the trainer's (``DdpmSchedule``)."""

    def __init__(self, pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float):
        import torch

        from comat_core.method.sampler import DdpmSchedule

        self.pipe, self.guidance = pipe, guidance
        self.schedule = DdpmSchedule(pipe.scheduler, steps)
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
        self.context = torch.cat([uncond, cond])
        size = pipe.unet.config.sample_size
        shape = (pipe.unet.config.in_channels, size, size)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]) * self.schedule.init_noise_sigma
        self.variance = [torch.stack([torch.randn(shape, generator=g) for g in gens])
                         if self.schedule.needs_noise(i) else None for i in range(len(self.schedule))]

    def latent(self, x):
        """The clean latent the sampler ends in from initial noise ``x``."""
        import torch

        for i, t in enumerate(self.schedule.timesteps):
            v_uncond, v_cond = self.pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=self.context).sample.chunk(2)
            x = self.schedule.step(v_uncond + self.guidance * (v_cond - v_uncond), i, x, self.variance[i])
        return x

    def image(self, latent):
        """Decoded image in [0, 1], ``[B, 3, H, W]``."""
        vae = self.pipe.vae
        return (vae.decode(latent / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def to_uint8(images01) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> uint8 ``[B, H, W, 3]``, rounded as the evaluation rounds its images."""
    import torch

    return (images01.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def descend(depth: str, sampler: FrozenSampler, loss_fn, targets: list[str], iters: int, checkpoints: set[int],
            lr: float, views: int = 1) -> dict[int, tuple[np.ndarray, list[float]]]:
    """Adam on the reward's loss of ``targets`` at ``depth`` (averaged over ``views`` random crops); per
    checkpoint, (uint8 images, per-image loss with one fixed crop)."""
    import torch

    with torch.no_grad():
        z0 = sampler.latent(sampler.x_T)
        start = {"pixels": sampler.image(z0), "latent": z0, "noise": sampler.x_T}[depth]
    param = start.clone().requires_grad_(True)
    render = {"pixels": lambda p: p.clamp(0, 1), "latent": sampler.image,
              "noise": lambda p: sampler.image(sampler.latent(p))}[depth]
    opt = torch.optim.Adam([param], lr=lr)
    out = {}
    for it in range(iters + 1):
        crop = torch.Generator().manual_seed(it)
        with torch.set_grad_enabled(it < iters):
            images = render(param)
            if it in checkpoints:
                with torch.no_grad():
                    per_image = [float(loss_fn(images[k : k + 1].detach(), [targets[k]], torch.Generator().manual_seed(0)))
                                 for k in range(len(targets))]
                out[it] = (to_uint8(images), per_image)
            if it == iters:
                break
            loss = sum(loss_fn(images, targets, crop) for _ in range(views)) / views
        opt.zero_grad()
        loss.backward()
        opt.step()
        if depth == "pixels":
            with torch.no_grad():
                param.clamp_(0, 1)
    return out


def summarise(trace: dict, prompts: list[str], targets: list[str]) -> dict:
    """Per checkpoint: binding to the prompt and to the target, mean loss, validity; and the transitions."""
    from comat_core.worlds.shapes import judge

    first = [judge.score(im, p) for im, p in zip(trace[0][0], prompts)]
    rows = {}
    for it, (images, losses) in trace.items():
        to_prompt = [judge.score(im, p) for im, p in zip(images, prompts)]
        to_target = [judge.score(im, t) for im, t in zip(images, targets)]
        was = np.array([v.binding for v in first])
        now = np.array([v.binding for v in to_prompt])
        rows[it] = {
            "loss": float(np.mean(losses)),
            "binding_to_prompt": float(now.mean()),
            "binding_to_target": float(np.mean([v.binding for v in to_target])),
            "wrong_to_right": f"{int((~was & now).sum())}/{int((~was).sum())}",
            "right_to_wrong": f"{int((was & ~now).sum())}/{int(was.sum())}",
            "validity": float(np.mean([v.validity for v in to_prompt])),
            "taxonomy": {k: n for k in judge.FAILURES if (n := [judge.failure(v) for v in to_prompt].count(k))},
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=None, help="a world folder (default: the shipped one)")
    parser.add_argument("--captioner", type=Path, default=None,
                        help="a captioner folder in place of the world's (benchmarks/shapes_captioner_pilot.py)")
    parser.add_argument("--depths", default=",".join(DEPTHS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--prompts", type=int, default=32, help="held-out two-object prompts (the first N)")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--lr", default="", help="depth=lr,... overriding the defaults " + str(LEARNING_RATES))
    parser.add_argument("--reward", choices=("captioner", "judge", "verdict"), default="captioner",
                        help="captioner: CoMat's concept activation; judge: the judge oracle's pixel target "
                             "(train.losses.concept_reward: shapes_judge), a reward right by construction; "
                             "verdict: a classifier distilled from the judge (benchmarks/shapes_verdict_pilot.py)")
    parser.add_argument("--verdict", type=Path, default=None, help="the verdict pilot's folder (--reward verdict)")
    parser.add_argument("--crop-max", type=int, default=2,
                        help="the captioner's random crop, 0..N px per side (train.losses.crop_max; 2 as in training)")
    parser.add_argument("--views", type=int, default=1,
                        help="average the captioner's loss over this many random crops per iteration")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--grid", type=Path, default=None, help="write a labelled grid per run into this folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from comat_core.method.losses.concept import ConceptActivationLoss
    from comat_core.models.loader import load_captioner
    from comat_core.worlds.shapes import PRETRAINED
    from comat_core.worlds.shapes.captioner import LABEL_SMOOTHING, PREFIX
    from comat_core.worlds.shapes.oracle import JudgeTargetLoss
    from comat_core.worlds.shapes.measure import category_prompts, labelled_grid, load_base
    from comat_core.worlds.shapes.settings import WorldConfig

    world = args.world or PRETRAINED
    config = WorldConfig(**json.loads((world / "world.json").read_text())["config"])
    prompts = category_prompts(config.seed, config.n_eval_prompts)["two"][: args.prompts]
    pipe = load_base(world / "base")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    if args.reward == "captioner":
        model, processor = load_captioner(str(args.captioner or world / "captioner"))
        model.requires_grad_(False)
        loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING,
                                        crop_max=args.crop_max)
    elif args.reward == "judge":
        loss_fn = JudgeTargetLoss()
    else:
        if args.verdict is None:
            parser.error("--reward verdict needs --verdict DIR (benchmarks/shapes_verdict_pilot.py OUT)")
        from comat_core.worlds.shapes.verdict import VerdictLoss, load_verdict

        loss_fn = VerdictLoss(load_verdict(args.verdict))
    lrs = dict(LEARNING_RATES, **{k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(",") if kv)})
    checkpoints = {0, args.iters // 4, args.iters // 2, args.iters}
    report = {"prompts": len(prompts), "iters": args.iters, "reward": args.reward, "learning_rates": lrs,
              "verdict": str(args.verdict) if args.verdict else None,
              "captioner": str(args.captioner) if args.captioner else "the world's",
              "crop_max": args.crop_max, "views": args.views, "runs": {}}
    for depth in args.depths.split(","):
        for target in args.targets.split(","):
            drawn = prompts if target == "prompt" else [p for p in prompts if swapped(p)]
            targets = drawn if target == "prompt" else [swapped(p) for p in drawn]
            sampler = FrozenSampler(pipe, drawn, [SEED] * len(drawn), args.steps, args.guidance)
            t0 = time.perf_counter()
            trace = descend(depth, sampler, loss_fn, targets, args.iters, checkpoints, lrs[depth], args.views)
            rows = summarise(trace, drawn, targets)
            report["runs"][f"{depth}/{target}"] = {"seconds": round(time.perf_counter() - t0, 1), "checkpoints": rows}
            for it, r in rows.items():
                print(f"{depth:>6} -> {target:<6} iter {it:3d}: loss {r['loss']:.3f}  binding to prompt "
                      f"{r['binding_to_prompt']:.3f} to target {r['binding_to_target']:.3f}  wrong->right "
                      f"{r['wrong_to_right']}  right->wrong {r['right_to_wrong']}  validity {r['validity']:.3f}",
                      flush=True)
            if args.grid:
                args.grid.mkdir(parents=True, exist_ok=True)
                last = trace[args.iters][0]
                pair = np.concatenate([trace[0][0][:8], last[:8]])
                labelled_grid(pair, targets[:8] * 2).save(
                    args.grid / f"{args.reward}_{depth}_{target}.png")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
