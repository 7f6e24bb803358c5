"""The ``evaluate`` stage: base vs tuned on the T2I-CompBench prompts, side by side (docs/method.md §8).

1. **Images** — for each model (``base``: the pretrained model; ``tuned``: the pre-finetuned UNet when
   there is one, plus the trained LoRA) and each category's prompts, ``images_per_prompt`` images with
   seeds ``seed + k`` (the same for both models). Shards of ``shard_size`` images: PNGs
   ``images/<model>/<category>/<prompt_idx>-<seed>.png`` and ``index/<model>-NNNNN.parquet``, each
   shard committed on its own; a rerun skips the shards that are done (and verified).
2. **Scores** — every registered metric that applies to an image's category scores it, shard by
   shard (``scores/<model>-NNNNN.parquet``, also committed per shard), from the stored PNGs.
3. **Report** — ``scores.parquet`` (one row per image and metric), ``summary.json``, ``report.md`` and
   ``grid.png`` (labelled: category and prompt per column, base and tuned rows), ``chart.png`` (base vs
   tuned per category, with the 95% interval of the difference).

Generation and scoring run one after the other, so the generator and the scoring models are never
in memory together.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pyarrow as pa

from comat_core.errors import InputError
from comat_core.models.generation import load_generator
from comat_core.models.loader import model_fingerprint
from comat_core.stages.prefinetune import prefinetuned_unet
from comat_core.stages.registry import input_digest
from comat_core.runtime import free_memory, resolve_device, weight_dtype
from comat_core.store.shards import check_fail_hook, part_summary, shards_to_do
from comat_core.stages.evaluate.generate import generate_images, plan_samples, shard_plan
from comat_core.stages.evaluate.metrics import EvalSample, MetricEnv, ScoringModels, headline_metric, metrics_for
from comat_core.stages.evaluate.prompt_sets import EvalPrompts, load_eval_prompts
from comat_core.stages.evaluate.report import chart_image, grid_headers, grid_image, render_markdown, summarise
from comat_core.stages.evaluate.shapes import SHAPES_CATEGORIES, verdicts

log = logging.getLogger("comat.evaluate")

MODELS = ("base", "tuned")
SCORE_SCHEMA = pa.schema([
    ("model", pa.string()), ("category", pa.string()), ("prompt_idx", pa.int32()), ("prompt", pa.string()),
    ("seed", pa.int64()), ("metric", pa.string()), ("value", pa.float64()),
])
INDEX_SCHEMA = pa.schema([
    ("model", pa.string()), ("category", pa.string()), ("prompt_idx", pa.int32()), ("prompt", pa.string()),
    ("seed", pa.int64()), ("image", pa.string()),
])


def run(ctx) -> dict:
    """Stage entry point (see comat_core.stages.registry)."""
    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    if "train" not in ctx.inputs:
        raise InputError("evaluate needs a completed train stage (its lora/ folder); run train first")
    prompts = load_eval_prompts(ev, cfg.storage.options)
    plans = {m: shard_plan(plan_samples(m, prompts.categories, ev.images_per_prompt, ev.seed), ev.shard_size)
             for m in MODELS}
    device = resolve_device(cfg)
    generated = generate_all(ctx, plans, device)
    if ctx.shard_part is not None:  # a fan-out part: scoring, report and manifest come with the last call
        return part_summary(ctx, image_shard_names(plans), len(generated))
    scored = score_all(ctx, plans, prompts, device, regenerated=set(generated))
    rows = collect_scores(ctx, plans)
    ctx.writer.put_table("scores.parquet", pa.Table.from_pylist(rows, schema=SCORE_SCHEMA))
    summary = build_summary(ctx, prompts, rows, device)
    write_grid(ctx, summary["grid"])  # first: it adds the judge's verdicts to the grid items (shapes world)
    ctx.writer.put_image("chart.png", chart_image(summary["results"]))
    ctx.writer.put_json("summary.json", summary)
    ctx.writer.put_bytes("report.md", render_markdown(summary).encode())
    headline = {c: e["metrics"].get(e["headline_metric"], {}) for c, e in summary["results"].items()}
    return {
        "images": sum(len(s) for plan in plans.values() for _, s in plan),
        "shards_generated": len(generated), "shards_scored": scored, "score_rows": len(rows),
        "headline": {c: {"metric": summary["results"][c]["headline_metric"], "base": h.get("base"),
                         "tuned": h.get("tuned"), "delta": h.get("delta")} for c, h in headline.items()},
    }


# ----------------------------------------------------------------------------------------------
# 1. Images


def image_shard_names(plans: dict[str, list[tuple[str, list[EvalSample]]]]) -> list[str]:
    """The image shards' manifest names in generation order: base shards, then tuned."""
    return [f"images-{name}" for m in MODELS for name, _ in plans[m]]


def generate_all(ctx, plans: dict[str, list[tuple[str, list[EvalSample]]]], device) -> list[str]:
    """Generate every image shard that is not done (of ``ctx.shard_part`` only, when set); returns their names.

    ``hooks["fail_at_shard"] = k`` raises before the k-th shard (counting base then tuned shards), for tests.
    """
    ordinal = {name: i for i, (name, _) in enumerate(s for m in MODELS for s in plans[m])}
    total = len(ordinal)
    names = image_shard_names(plans)
    todo = {names[k].removeprefix("images-") for k in shards_to_do(ctx, names)}
    generated = []
    for model in MODELS:
        pending = [(n, s) for n, s in plans[model] if n in todo]
        log.info("evaluate: %s model, %d of %d image shards to generate", model, len(pending), len(plans[model]))
        if not pending:
            continue
        pipe = load_model(ctx, model, device)
        for name, samples in pending:
            check_fail_hook(ctx, ordinal[name], name)
            write_image_shard(ctx, name, samples, generate_images(pipe, samples, ctx.cfg))
            generated.append(name)
            ctx.progress(ordinal[name] + 1, total, f"generated {name}")
        del pipe
        free_memory()
    return generated


def load_model(ctx, model: str, device):
    """``base``: the pretrained pipeline; ``tuned``: pre-finetuned UNet (if any) plus the trained LoRA."""
    if model == "base":
        return load_generator(ctx.cfg, device)
    lora_dir = ctx.inputs["train"].download_tree("lora", ctx.scratch() / "lora")
    if not any(lora_dir.iterdir()):
        raise InputError(f"the train stage at {ctx.inputs['train'].url} has no lora/ files; rerun train")
    return load_generator(ctx.cfg, device, unet_dir=prefinetuned_unet(ctx), lora_dir=str(lora_dir))


def write_image_shard(ctx, name: str, samples: list[EvalSample], images: list) -> None:
    files = []
    for sample, image in zip(samples, images):
        ctx.writer.put_image(sample.image_path, image)
        files.append(sample.image_path)
    rows = [{"model": s.model, "category": s.category, "prompt_idx": s.prompt_idx, "prompt": s.prompt,
             "seed": s.seed, "image": s.image_path} for s in samples]
    index = f"index/{name}.parquet"
    ctx.writer.put_table(index, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    ctx.writer.commit_shard(f"images-{name}", files + [index], {"images": len(samples)})


# ----------------------------------------------------------------------------------------------
# 2. Scores


def score_all(ctx, plans, prompts: EvalPrompts, device, regenerated: set[str] = frozenset()) -> int:
    """Score every image shard whose scores are missing or older than its (re)generated images."""
    pending = [(n, s) for m in MODELS for n, s in plans[m]
               if n in regenerated or not ctx.writer.shard_done(f"scores-{n}")]
    if not pending:
        return 0
    env = MetricEnv(ScoringModels(ctx.cfg.models, device), ctx.cfg.evaluate, prompts.routing)
    instances: dict[str, object] = {}
    for done, (name, samples) in enumerate(pending, 1):
        rows = score_samples(ctx, env, instances, samples)
        rel = f"scores/{name}.parquet"
        ctx.writer.put_table(rel, pa.Table.from_pylist(rows, schema=SCORE_SCHEMA))
        ctx.writer.commit_shard(f"scores-{name}", [rel], {"rows": len(rows)})
        ctx.progress(done, len(pending), f"scored {name}")
    del env
    free_memory()
    return len(pending)


def score_samples(ctx, env: MetricEnv, instances: dict, samples: list[EvalSample]) -> list[dict]:
    """Rows (one per image and metric value) for the samples of one shard, read back from storage."""
    images = [read_image(ctx, s.image_path) for s in samples]
    rows = []
    for category in dict.fromkeys(s.category for s in samples):
        idx = [i for i, s in enumerate(samples) if s.category == category]
        cat_samples, cat_images = [samples[i] for i in idx], [images[i] for i in idx]
        for cls in metrics_for(category):
            metric = instances.setdefault(cls.name, cls(env))
            for metric_name, values in metric.score(cat_images, cat_samples).items():
                rows += [_row(s, metric_name, v) for s, v in zip(cat_samples, values) if v is not None]
    return rows


def _row(sample: EvalSample, metric: str, value: float) -> dict:
    return {"model": sample.model, "category": sample.category, "prompt_idx": sample.prompt_idx,
            "prompt": sample.prompt, "seed": sample.seed, "metric": metric, "value": float(value)}


def read_image(ctx, rel: str):
    from PIL import Image

    image = Image.open(io.BytesIO(ctx.store.read_bytes(ctx.writer.path(rel))))
    image.load()
    return image.convert("RGB")


def collect_scores(ctx, plans) -> list[dict]:
    """All score rows, in plan order (base shards, then tuned)."""
    import pyarrow.parquet as pq

    rows = []
    for model in MODELS:
        for name, _ in plans[model]:
            data = ctx.store.read_bytes(ctx.writer.path(f"scores/{name}.parquet"))
            rows += pq.read_table(io.BytesIO(data)).to_pylist()
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Report


def code_fingerprint() -> str:
    """sha256 over this package's sources: two reports with the same value used the same metric code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_summary(ctx, prompts: EvalPrompts, rows: list[dict], device) -> dict:
    from comat_core.stages.registry import STAGES

    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    headline = {c: headline_metric(c) for c in ev.categories}
    return {
        "code": {"stage_version": STAGES["evaluate"].code_version, "source_sha256": code_fingerprint()},
        "models": model_records(ctx),
        "protocol": {
            "scheduler": "DDPMScheduler (from the model's scheduler config)",
            "num_inference_steps": ev.num_inference_steps, "guidance_scale": ev.guidance_scale,
            "resolution": ev.resolution, "dtype": str(weight_dtype(cfg, device)).replace("torch.", ""),
            "images_per_prompt": ev.images_per_prompt,
            "seeds": [ev.seed + k for k in range(ev.images_per_prompt)],
            "prompts_per_category": {c: len(p) for c, p in prompts.categories.items()},
            "bootstrap_samples": ev.bootstrap_samples, "bootstrap_seed": ev.seed,
            "parser": ev.parser, "detector_box_threshold": ev.detector_box_threshold,
        },
        "prompt_files": prompts.file_record(),
        "results": summarise(rows, ev.categories, headline, ev.bootstrap_samples, ev.seed),
        "grid": grid_samples(prompts, ev),
    }


def model_records(ctx) -> dict:
    """Names and fingerprints of every model the numbers depend on (LoRA: the train stage's manifest)."""
    m = ctx.cfg.models
    out = {role: {"name": getattr(m, role), "fingerprint": model_fingerprint(getattr(m, role))}
           for role in ("pretrained", "vqa", "clip", "grounding_dino", "captioner")}
    if m.vae:
        out["vae"] = {"name": m.vae, "fingerprint": model_fingerprint(m.vae)}
    for stage, role, folder in (("train", "lora", "lora/"), ("sdxl_prefinetune", "prefinetune_unet", "unet/")):
        reader = ctx.inputs.get(stage)
        if reader is not None:
            digest = input_digest(ctx.store, stage, reader.key)
            # the path inside the store, not an absolute URL: the report compares equal across stores and reruns
            out[role] = {"name": f"{stage}/{reader.key}/{folder}", "fingerprint": f"{stage}:{reader.key}:{digest[:16]}"}
    return out


def grid_samples(prompts: EvalPrompts, ev) -> list[dict]:
    """The grid's prompts: round-robin over the categories, first seed, at most ``grid_prompts``."""
    cats = [c for c in ev.categories if prompts.categories.get(c)]
    out, j = [], 0
    longest = max((len(prompts.categories[c]) for c in cats), default=0)
    while len(out) < ev.grid_prompts and j < len(cats) * longest:
        category, idx = cats[j % len(cats)], j // len(cats)
        if idx < len(prompts.categories[category]):
            out.append({"category": category, "prompt_idx": idx, "seed": ev.seed,
                        "prompt": prompts.categories[category][idx]})
        j += 1
    return out


def write_grid(ctx, items: list[dict]) -> None:
    if not items:
        return
    images = {m: [read_image(ctx, EvalSample(m, it["category"], it["prompt_idx"], it["prompt"], it["seed"]).image_path)
                  for it in items] for m in MODELS}
    labels = None
    if all(it["category"] in SHAPES_CATEGORIES for it in items):  # the judge's verdict under each image
        labels = {m: [v.summary() for v in verdicts(images[m], [it["prompt"] for it in items])] for m in MODELS}
        for i, item in enumerate(items):
            item["verdict"] = {m: labels[m][i] for m in MODELS}
    ctx.writer.put_image("grid.png", grid_image(images["base"], images["tuned"], labels=labels,
                                                headers=grid_headers(items)))
