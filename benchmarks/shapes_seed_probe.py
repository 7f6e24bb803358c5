"""Does a CoMat LoRA of the shapes world generalise beyond the noise it was trained from?

With ``train.noise: replay`` and ``gan_gt.samples_per_prompt: 1`` every training prompt
always starts from the same initial noise (its ground-truth sample's). A LoRA can then improve the
training images without learning anything that carries to other seeds. This probe draws the training
prompts with the base model and with a trained LoRA twice: from the training seeds (the ``gan_gt``
index) and from other seeds (``--seeds``), and has the judge score every image.

    python benchmarks/shapes_seed_probe.py --storage /tmp/shapes-bench --train-key <key> [--world DIR]
        [--checkpoint STEP]

Reads the ``prompts``, ``gan_gt`` and ``train`` stage folders of that storage (the train stage names
its inputs in its manifest). Prints binding / recall for base and tuned, per seed set, with 95 %
paired bootstrap intervals over prompts; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def judge_all(images, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from comat_core.worlds.shapes import judge

    verdicts = [judge.score(np.asarray(im), p) for im, p in zip(images, prompts)]
    return np.array([v.binding for v in verdicts], float), np.array([v.recall for v in verdicts], float)


def paired_interval(delta_by_prompt: np.ndarray) -> list[float]:
    """95 % interval of the mean paired delta over prompts (the evaluate stage's bootstrap)."""
    from comat_core.stages.evaluate.report import bootstrap_ci

    return list(bootstrap_ci({i: [float(d)] for i, d in enumerate(delta_by_prompt)}, samples=1000, seed=0))


def load_tuned(pipe, storage: Path, train_key: str, checkpoint: int | None) -> None:
    """The run's final LoRA into ``pipe``, or the LoRA of a committed checkpoint of the train stage."""
    train_dir = storage / "train" / train_key
    if checkpoint is None:
        pipe.load_lora_weights(str(train_dir / "lora"))
        return
    from safetensors.torch import load

    from comat_core.models.lora import add_lora, load_lora_state_dict
    from comat_core.store.checkpoint import committed_checkpoints
    from comat_core.store.full_state import GENERATOR
    from comat_core.store.storage import ArtifactStore

    store = ArtifactStore(str(storage))
    writer = store.writer("train", train_key)
    kept = {ref.step: ref for ref in committed_checkpoints(writer)}
    if checkpoint not in kept:
        raise SystemExit(f"no committed checkpoint at step {checkpoint} in {train_dir} (kept: {sorted(kept)})")
    lora = json.loads((train_dir / "lora" / "comat.json").read_text())
    add_lora(pipe.unet, lora["rank"], lora["alpha"], lora["target_modules"])
    load_lora_state_dict(pipe.unet, load(store.read_bytes(writer.path(f"{kept[checkpoint].folder}/{GENERATOR}"))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, required=True, help="a local storage root of a shapes run")
    parser.add_argument("--train-key", required=True, help="the train stage's key (folder name)")
    parser.add_argument("--world", type=Path, default=None, help="a world folder (default: the shipped one)")
    parser.add_argument("--seeds", default="0,1", help="other seeds per prompt (comma separated)")
    parser.add_argument("--checkpoint", type=int, default=None,
                        help="judge the LoRA of this kept checkpoint step instead of the final one")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    import torch

    from comat_core.models.generation import draw
    from comat_core.worlds.shapes import PRETRAINED
    from comat_core.worlds.shapes.measure import load_base
    from comat_core.worlds.shapes.render import IMAGE_SIZE

    train_dir = args.storage / "train" / args.train_key
    inputs = json.loads((train_dir / "_manifest.json").read_text())["inputs"]
    prompts_dir = args.storage / "prompts" / inputs["prompts"]["key"]
    gan_gt_dir = args.storage / "gan_gt" / inputs["gan_gt"]["key"]
    text = dict(zip(*pq.read_table(prompts_dir / "prompts.parquet", columns=["prompt_id", "text"]).to_pydict().values()))
    index = pq.ParquetDataset(sorted(str(p) for p in gan_gt_dir.glob("index-*.parquet"))).read().to_pydict()
    rows = [i for i, s in enumerate(index["sample"]) if s == 0]
    prompts = [text[index["prompt_id"][i]] for i in rows]
    seed_sets = {"training seeds": [int(index["seed"][i]) for i in rows]}
    for s in args.seeds.split(","):
        seed_sets[f"seed {s}"] = [int(s)] * len(prompts)

    pipe = load_base((args.world or PRETRAINED) / "base")
    results = {}
    with torch.no_grad():
        for model in ("base", "tuned"):
            if model == "tuned":
                load_tuned(pipe, args.storage, args.train_key, args.checkpoint)
            for name, seeds in seed_sets.items():
                images = []
                for i in range(0, len(prompts), 32):
                    images += draw(pipe, prompts[i : i + 32], seeds[i : i + 32], resolution=IMAGE_SIZE,
                                   num_inference_steps=args.steps, guidance_scale=args.guidance)
                results.setdefault(name, {})[model] = judge_all(images, prompts)
    report = {}
    for name, by_model in results.items():
        (bb, rb), (bt, rt) = by_model["base"], by_model["tuned"]
        report[name] = {"binding": [float(bb.mean()), float(bt.mean())], "binding_delta_ci95": paired_interval(bt - bb),
                        "recall": [float(rb.mean()), float(rt.mean())], "recall_delta_ci95": paired_interval(rt - rb),
                        "prompts": len(prompts),
                        # per prompt (one image each), so runs of several training seeds can be pooled
                        "binding_per_prompt": {"base": bb.astype(int).tolist(), "tuned": bt.astype(int).tolist()}}
        print(f"{name:>15}: binding {bb.mean():.3f} -> {bt.mean():.3f} (delta CI {report[name]['binding_delta_ci95']}), "
              f"recall {rb.mean():.3f} -> {rt.mean():.3f} (delta CI {report[name]['recall_delta_ci95']})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
