"""Does the shapes world's captioner (CoMat's teacher) bind colours to shapes on the images CoMat trains?

CoMat can only teach what its captioner rewards. The world's captioner is trained on clean renders and
prefers the true caption to the colour-swapped one on 400/400 renders; the generated images it scores
during training are blurrier. This probe asks the same question on three kinds of images, with the
judge supplying the truth:

* ``renders``: two-object renders (different colours and shapes), true vs colour-swapped caption;
* ``vae``: the same renders through the world's VAE (encode, decode): blur without generation errors;
* ``generated``: images of an evaluate stage (base and tuned) that the judge reads as exactly two
  clean objects of different colours and shapes; the judge's reading vs its colour swap.

A teacher that binds scores near 1.0 on all three; near 0.5 it cannot tell a red circle and a blue
square from a blue circle and a red square, and its gradient cannot teach binding. Beside it, the loss of
the true caption and the mean margin to the swapped one: how much of the concept loss the binding is worth.

Usage (the evaluate stage of a ``shapes`` run, e.g. from ``benchmarks/shapes_world.py``)::

    python benchmarks/shapes_teacher_probe.py /tmp/shapes-bench/evaluate/<key> [--world DIR] [--out F.json]

``--world`` is a world folder (``base/``, ``captioner/``; default: the one shipped in the package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def caption_losses(loss_fn, images: np.ndarray, true: list[str], swapped: list[str],
                   batch: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the captioner's concept loss of ``true`` and of ``swapped`` (nats per token)."""
    from comat_core.worlds.shapes.captioner import per_sample_loss, to_unit

    a, b = [np.zeros(0)], [np.zeros(0)]
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_unit(images[i : i + batch])
            a.append(per_sample_loss(loss_fn, x, true[i : i + batch]).numpy())
            b.append(per_sample_loss(loss_fn, x, swapped[i : i + batch]).numpy())
    return np.concatenate(a), np.concatenate(b)


def two_clean_objects(found) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The (colour, shape) of each of exactly two recognised objects the judge found, else None."""
    if len(found) != 2 or any(f.shape is None for f in found):
        return None
    return (found[0].colour, found[0].shape), (found[1].colour, found[1].shape)


def judged_pairs(images: list[np.ndarray]) -> tuple[list[int], list[str], list[str]]:
    """Images the judge reads as two clean objects of different colours and shapes: index, reading, swap."""
    from comat_core.worlds.shapes import judge
    from comat_core.worlds.shapes.splits import two_object_prompt

    keep, true, swapped = [], [], []
    for i, image in enumerate(images):
        pair = two_clean_objects(judge.segment(image))
        if pair is None:
            continue
        (c1, s1), (c2, s2) = pair
        if c1 == c2 or s1 == s2:
            continue
        keep.append(i)
        true.append(two_object_prompt((c1, s1), (c2, s2)))
        swapped.append(two_object_prompt((c2, s1), (c1, s2)))
    return keep, true, swapped


def interval(wins: np.ndarray) -> list[float]:
    """95 % bootstrap interval of the mean over images (the evaluate stage's bootstrap, one value per image)."""
    from comat_core.stages.evaluate.report import bootstrap_ci

    ci = bootstrap_ci({i: [float(w)] for i, w in enumerate(wins)}, samples=1000, seed=0)
    return list(ci) if ci else [float("nan"), float("nan")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluate_dir", type=Path, help="an evaluate stage's output folder (images/, index/)")
    parser.add_argument("--world", type=Path, default=None, help="a world folder (default: the shipped one)")
    parser.add_argument("--renders", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    from PIL import Image

    from comat_core.method.losses.concept import ConceptActivationLoss
    from comat_core.models.loader import load_captioner
    from comat_core.worlds.shapes import PRETRAINED, base_model
    from comat_core.worlds.shapes.measure import load_base
    from comat_core.worlds.shapes.captioner import LABEL_SMOOTHING, PREFIX, swap_test_set

    world = args.world or PRETRAINED
    model, processor = load_captioner(str(world / "captioner"))
    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    results = {}

    def record(name: str, images: np.ndarray, true: list[str], swapped: list[str], n_images: int) -> None:
        """Binding accuracy (true below swapped), and the loss of the true caption beside the margin to the swap:
        how much of the loss the binding is worth."""
        loss_true, loss_swapped = caption_losses(loss_fn, images, true, swapped)
        wins = loss_true < loss_swapped
        r = results[name] = {"accuracy": float(wins.mean()) if len(wins) else float("nan"), "ci95": interval(wins),
                             "n": int(len(wins)), "images": n_images, "loss_true": float(loss_true.mean()),
                             "margin": float((loss_swapped - loss_true).mean())}
        print(f"{name:>18}: binds {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] on {r['n']} of "
              f"{n_images}; loss of the true caption {r['loss_true']:.3f}, swapped minus true {r['margin']:+.3f}",
              flush=True)

    renders, true, swapped = swap_test_set(args.renders, seed=12345)
    record("renders", renders, true, swapped, len(renders))
    vae = load_base(world / "base").vae
    recon = base_model.reconstruct(vae, renders)
    record("vae", recon, true, swapped, len(recon))
    keep, true_v, swapped_v = judged_pairs(list(recon))  # the VAE's images the judge still reads exactly
    record("vae, judged", recon[keep], true_v, swapped_v, len(recon))

    index = pq.read_table(args.evaluate_dir / "index").to_pydict()
    for model_name in ("base", "tuned"):
        rows = [i for i, m in enumerate(index["model"]) if m == model_name and index["category"][i] != "shapes_single"]
        images = np.stack([np.asarray(Image.open(args.evaluate_dir / index["image"][i]).convert("RGB")) for i in rows])
        keep, true_g, swapped_g = judged_pairs(list(images))
        record(f"generated, {model_name}", images[keep], true_g, swapped_g, len(images))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
