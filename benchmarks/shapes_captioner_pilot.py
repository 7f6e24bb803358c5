"""A captioner pilot for the shapes world: the world's recipe, with images that look generated (run by hand).

CoMat on the shapes world lowers the captioner's loss partly by drawings the judge counts as wrong:
the world's captioner is small and has seen only clean renders, so its gradient on the soft images the
UNet draws need not point toward right drawings. BLIP, CoMat's real captioner, saw hundreds of
millions of varied images. This pilot trains the world's captioner (same data, seeds, size and
steps as ``WorldConfig``'s) on images that are, with probability ``--vae-share``, the world VAE's
reconstruction of the render (soft edges, as the UNet's images decode), plus Gaussian pixel noise of
a standard deviation drawn uniformly in ``[0, --noise]`` per image. Captions stay exact.

    python benchmarks/shapes_captioner_pilot.py OUT [--noise 0.1] [--vae-share 0.5] [--adversarial 1.0]

``--adversarial EPS`` trains on L2 adversarial images instead (``make_adversarial``), so that the
captioner's gradient, which is what trains the UNet, points at changes the judge can see.

Writes ``OUT/captioner/`` (use it with ``--set models.captioner=OUT/captioner``) and
``OUT/pilot.json``: the training loss and time, and the captioner's binding on renders (the world's
``captioner_binding`` probe). Its binding on base images is measured with
``benchmarks/shapes_reward_probe.py EVALUATE_DIR --world OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_augment(noise: float):
    """``augment(images01, captions, generator)``: add Gaussian noise, its std uniform in [0, noise] per image."""

    def augment(images01: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        std = torch.rand(images01.shape[0], 1, 1, 1, generator=generator) * noise
        return (images01 + std * torch.randn(images01.shape, generator=generator)).clamp(0, 1)

    return augment


def make_adversarial(model, processor, eps: float, steps: int, then=None):
    """``augment``: the worst image within an L2 ball of radius ``eps`` around each (``then``-augmented)
    image for the captioner being trained, by ``steps`` steps of projected gradient ascent on its loss
    of the true caption (step ``2.5 eps / steps``). Training on them is adversarial training, which
    makes a classifier's input gradients point at what a person sees ("perceptually aligned"), the
    property CoMat needs of its captioner: its gradient is what trains the UNet."""
    from comat_core.method.losses.concept import ConceptActivationLoss
    from comat_core.worlds.shapes.captioner import LABEL_SMOOTHING, PREFIX, _training_loss

    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    step = 2.5 * eps / steps

    def augment(images01: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        if then is not None:
            images01 = then(images01, captions, generator)
        delta = torch.zeros_like(images01)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = _training_loss(loss_fn, (images01 + delta).clamp(0, 1), captions, generator)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + step * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(eps)).view(-1, 1, 1, 1)
        return (images01 + delta.detach()).clamp(0, 1)

    return augment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for captioner/ and pilot.json")
    parser.add_argument("--noise", type=float, default=0.1, help="largest per-image pixel noise std (images in [0, 1])")
    parser.add_argument("--vae-share", type=float, default=0.5, help="share of training images replaced by VAE reconstructions")
    parser.add_argument("--adversarial", type=float, default=0.0,
                        help="train on L2 adversarial images of this radius (images in [0, 1]; 0: off)")
    parser.add_argument("--pgd-steps", type=int, default=3, help="gradient-ascent steps per adversarial image")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the world's captioner_steps)")
    parser.add_argument("--world", type=Path, default=None, help="a world folder for the VAE (default: the shipped one)")
    args = parser.parse_args(argv)

    import numpy as np
    from diffusers import AutoencoderKL

    from comat_core.worlds.shapes import PRETRAINED, captioner
    from comat_core.worlds.shapes.base_model import reconstruct
    from comat_core.worlds.shapes.data import captioner_dataset
    from comat_core.worlds.shapes.settings import WorldConfig

    config, world = WorldConfig(), args.world or PRETRAINED
    torch.manual_seed(config.seed)
    start = time.time()
    data = captioner_dataset(config.captioner_images, config.seed + 300, config.size_ranges)
    vae = AutoencoderKL.from_pretrained(world / "base" / "vae").eval()
    rng = np.random.default_rng(config.seed + 303)
    soft = rng.random(len(data.images)) < args.vae_share
    images = data.images.copy()
    images[soft] = reconstruct(vae, data.images[soft])
    print(f"{int(soft.sum())} of {len(images)} training images are VAE reconstructions", flush=True)
    model, processor = captioner.build_captioner(config.seed + 301, config.captioner_hidden, config.captioner_layers)

    def progress(part, done, total, info):
        if done % 500 == 1 or done == total:
            print(f"{part} {done}/{total} {info}", flush=True)

    augment = make_augment(args.noise)
    if args.adversarial > 0:
        augment = make_adversarial(model, processor, args.adversarial, args.pgd_steps, then=augment)
    metrics = captioner.train_captioner(model, processor, images, data.captions, steps=args.steps or config.captioner_steps,
                                        batch_size=config.captioner_batch, lr=config.captioner_lr,
                                        seed=config.seed + 302, progress=progress, augment=augment)
    metrics["captioner_binding"] = captioner.binding_accuracy(model, processor, n=config.captioner_probe)
    captioner.save_captioner(args.out / "captioner", model, processor)
    record = {"noise": args.noise, "vae_share": args.vae_share, "adversarial_l2": args.adversarial,
              "pgd_steps": args.pgd_steps, "seconds": round(time.time() - start, 1), **metrics}
    (args.out / "pilot.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
