"""Does CoMat's reward see the base model's errors? The captioner's loss of the prompt, by failure kind.

Concept activation lowers the captioner's loss of the prompt on the image the UNet draws. It can teach
the UNet to fix an error only if an image with that error gets a higher loss than a correct one. This
probe reads the images of an evaluate stage (held-out two-object prompts and unseen combinations, base
and tuned), asks the judge what kind each image is (``correct``, ``a shape wrong``, ``colours swapped``,
...) and the captioner for the loss of its prompt, then reports two things per failure kind:

* ``within-prompt AUC``: over pairs of images *of the same prompt*, one correct and one with that
  error, the share in which the correct image has the lower loss (ties count half). 1.0: the reward
  always prefers the correct drawing; 0.5: it cannot tell them apart, and its gradient cannot fix
  that error. Pairing within a prompt removes the prompts' different difficulty.
* ``prefers what was drawn``: for images of two recognised objects that are not the prompt, the share
  where the captioner gives the judge's reading of the image (``a red circle and a blue circle``) a
  lower loss than the prompt (``a red circle and a blue square``): the captioner sees the error.

Usage::

    python benchmarks/shapes_reward_probe.py EVALUATE_DIR [--world DIR] [--out F.json]

``EVALUATE_DIR`` is an evaluate stage's output folder on local disk (``images/``, ``index/``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CATEGORIES = ("shapes", "shapes_new")


def reading(verdict) -> str | None:
    """The judge's reading of a two-object image as a prompt of the world's template (None if not two clean objects)."""
    from comat_core.worlds.shapes.splits import two_object_prompt
    from shapes_teacher_probe import two_clean_objects

    pair = two_clean_objects(verdict.found)
    return two_object_prompt(*pair) if pair else None


def within_prompt_auc(rows: list[dict], kind: str) -> tuple[float, int]:
    """P(loss of a correct image < loss of a ``kind`` image), over pairs of images of one prompt; (AUC, pairs)."""
    by_prompt: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_prompt[r["prompt"]][r["kind"]].append(r["loss"])
    wins, pairs = 0.0, 0
    for kinds in by_prompt.values():
        for good in kinds.get("correct", []):
            for bad in kinds.get(kind, []):
                wins += 1.0 if good < bad else 0.5 if good == bad else 0.0
                pairs += 1
    return (wins / pairs if pairs else float("nan")), pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluate_dir", type=Path, help="an evaluate stage's output folder (images/, index/)")
    parser.add_argument("--world", type=Path, default=None, help="a world folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    from PIL import Image

    from comat_core.method.losses.concept import ConceptActivationLoss
    from comat_core.models.loader import load_captioner
    from comat_core.worlds.shapes import PRETRAINED, judge
    from comat_core.worlds.shapes.captioner import LABEL_SMOOTHING, PREFIX
    from shapes_teacher_probe import caption_losses

    world = args.world or PRETRAINED
    model, processor = load_captioner(str(world / "captioner"))
    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    index = pq.read_table(args.evaluate_dir / "index").to_pydict()
    results: dict[str, dict] = {}
    for model_name in ("base", "tuned"):
        picked = [i for i, m in enumerate(index["model"]) if m == model_name and index["category"][i] in CATEGORIES]
        images = np.stack([np.asarray(Image.open(args.evaluate_dir / index["image"][i]).convert("RGB"))
                           for i in picked])
        prompts = [index["prompt"][i] for i in picked]
        verdicts = [judge.score(im, p) for im, p in zip(images, prompts)]
        readings = [reading(v) or p for v, p in zip(verdicts, prompts)]
        loss_prompt, loss_reading = caption_losses(loss_fn, images, prompts, readings)
        rows = [{"prompt": p, "kind": judge.failure(v), "loss": float(lp), "sees": float(lr < lp), "read": r != p}
                for p, v, lp, lr, r in zip(prompts, verdicts, loss_prompt, loss_reading, readings)]
        out = results[model_name] = {}
        for kind in judge.FAILURES:
            of_kind = [r for r in rows if r["kind"] == kind]
            if not of_kind:
                continue
            auc, pairs = within_prompt_auc(rows, kind) if kind != "correct" else (float("nan"), 0)
            read = [r["sees"] for r in of_kind if r["read"]]
            out[kind] = {"images": len(of_kind), "mean_loss": float(np.mean([r["loss"] for r in of_kind])),
                         "within_prompt_auc": auc, "pairs": pairs,
                         "prefers_what_was_drawn": float(np.mean(read)) if read else float("nan"),
                         "read_images": len(read)}
            print(f"{model_name:>5} {kind:>20}: {len(of_kind):4d} images, loss of the prompt "
                  f"{out[kind]['mean_loss']:.3f}, within-prompt AUC {auc:.3f} ({pairs} pairs), "
                  f"prefers what was drawn {out[kind]['prefers_what_was_drawn']:.3f} "
                  f"({len(read)} read)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
