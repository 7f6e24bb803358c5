"""Summaries of the evaluation scores: means, paired deltas with bootstrap intervals, the markdown table, the grid.

Everything here is computed from the rows of ``scores.parquet`` (model, category, prompt_idx,
prompt, seed, metric, value), so the report can always be rebuilt from the table and checked against it.

The 95% interval of the delta (tuned − base) is a paired cluster bootstrap: base and tuned values are
paired by (prompt, seed), the pairs are grouped by prompt, and prompts are resampled with
replacement (the images of one prompt are not independent draws). The generator is seeded per
(category, metric), so a report does not depend on the order in which it was computed.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from comat_core.stages.evaluate.metrics import higher_is_better

# docs/method.md §8: published T2I-CompBench figures (colour / shape / texture / spatial / non-spatial / complex).
PUBLISHED = {
    "SD1.5": {"color": 0.3758, "shape": 0.3713, "texture": 0.4186, "spatial": 0.1165, "non_spatial": 0.3112,
              "complex": 0.3047},
    "SDXL": {"color": 0.5879, "shape": 0.4687, "texture": 0.5299, "spatial": 0.2131, "non_spatial": 0.3119,
             "complex": 0.3237},
    "CoMat-SDXL": {"color": 0.7827, "shape": 0.5329, "texture": 0.6468, "spatial": 0.2428, "non_spatial": 0.3187,
                   "complex": 0.3680},
}
MODELS = ("base", "tuned")

# Below these counts (per category, headline metric) an interval is too wide, and too unstable under the
# prompt bootstrap, to say anything: the report and every copy of its numbers say so.
MIN_PAIRS = 50
MIN_PROMPTS = 10
RANDOM_MODEL_SCHEMES = ("tiny://",)  # models built with random weights (the tiny presets)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _stable_seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return (int(seed) * 1_000_003 + int.from_bytes(digest[:4], "big")) % (2**32)


def paired_deltas(rows: Iterable[dict]) -> dict[int, list[float]]:
    """tuned − base per (prompt, seed) pair present in both models, grouped by prompt index."""
    values: dict[str, dict[tuple[int, int], float]] = {m: {} for m in MODELS}
    for r in rows:
        if r["model"] in values:
            values[r["model"]][(r["prompt_idx"], r["seed"])] = r["value"]
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for key in sorted(values["base"].keys() & values["tuned"].keys()):
        by_prompt[key[0]].append(values["tuned"][key] - values["base"][key])
    return dict(by_prompt)


def bootstrap_ci(deltas_by_prompt: dict[int, list[float]], samples: int, seed: int,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the mean paired delta, resampling prompts with replacement."""
    if not deltas_by_prompt:
        return None
    sums = np.array([sum(v) for v in deltas_by_prompt.values()], dtype=np.float64)
    counts = np.array([len(v) for v in deltas_by_prompt.values()], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(samples, len(sums)))
    replicates = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def summarise(rows: Sequence[dict], categories: Sequence[str], headline: dict[str, str],
              bootstrap_samples: int, seed: int) -> dict:
    """Per category and metric: base and tuned means, delta, 95% CI of the delta, counts."""
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        grouped[(r["category"], r["metric"])].append(r)
    out = {}
    for category in categories:
        metrics = sorted({m for (c, m) in grouped if c == category}, key=lambda m: (m != headline.get(category), m))
        entry = {"headline_metric": headline.get(category), "metrics": {}}
        for metric in metrics:
            group = grouped[(category, metric)]
            means = {m: _mean([r["value"] for r in group if r["model"] == m]) for m in MODELS}
            counts = {m: sum(r["model"] == m for r in group) for m in MODELS}
            deltas = paired_deltas(group)
            delta = None if None in means.values() else means["tuned"] - means["base"]
            ci = bootstrap_ci(deltas, bootstrap_samples, _stable_seed(seed, category, metric))
            entry["metrics"][metric] = {
                "base": means["base"], "tuned": means["tuned"], "delta": delta,
                "higher_is_better": higher_is_better(metric),
                "ci95": list(ci) if ci else None, "n_images": counts,
                "n_pairs": sum(len(v) for v in deltas.values()), "n_prompts": len(deltas),
            }
        out[category] = entry
    return out


def caveat(summary: dict) -> str | None:
    """Why these numbers carry no meaning, or None: random (tiny) models, or too few pairs or prompts.

    The report, the console summary and the model card all print this sentence above the numbers,
    and none of them then calls an interval significant."""
    base = ((summary.get("models") or {}).get("pretrained") or {}).get("name", "")
    if str(base).startswith(RANDOM_MODEL_SCHEMES):  # the evaluated model (the shapes world's judge is exact)
        return ("These numbers carry no meaning: the models are random (tiny preset), built only to test that "
                "the pipeline runs; no difference here is significant.")
    small = []
    for category, entry in (summary.get("results") or {}).items():
        m = (entry.get("metrics") or {}).get(entry.get("headline_metric")) or {}
        if m.get("n_pairs", 0) < MIN_PAIRS or m.get("n_prompts", 0) < MIN_PROMPTS:
            small.append(f"{category} ({m.get('n_pairs', 0)} pairs, {m.get('n_prompts', 0)} prompts)")
    if small:
        return (f"These numbers carry no meaning: too few samples for an interval to say anything (at least "
                f"{MIN_PAIRS} pairs over {MIN_PROMPTS} prompts per category; here {', '.join(small)}); "
                "no difference here is significant.")
    return None


# ----------------------------------------------------------------------------------------------
# Markdown


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def fmt_ci(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def table_row(category: str, metric: str, m: dict) -> str:
    return (f"| {category} | {metric} | {fmt(m['base'])} | {fmt(m['tuned'])} | {fmt(m['delta'], True)} "
            f"| {fmt_ci(m['ci95'])} | {m['n_pairs']} |")


TABLE_HEADER = ("| category | metric | base | tuned | Δ (tuned − base) | 95% CI of Δ | pairs |\n"
                "|---|---|---|---|---|---|---|")


def render_markdown(summary: dict) -> str:
    """The side-by-side report: headline table, secondary metrics, provenance, published figures."""
    results = summary["results"]
    world = bool(results) and all(c.startswith("shapes") for c in results)
    if world:
        lines = ["# Evaluation: base vs tuned (shapes world, scored by its judge)", ""]
        lines += ["## Scores", "", "Binding accuracy per category: every colour-shape pair of the prompt present as "
                  "one object and nothing else (higher is better). shapes: held-out prompts the training never "
                  "saw; shapes_train: training prompts; shapes_single: one object.", "", TABLE_HEADER]
    else:
        lines = ["# Evaluation: base vs tuned (T2I-CompBench protocol)", ""]
        lines += ["## Scores", "", "T2I-CompBench score per category (higher is better).", "", TABLE_HEADER]
    warning = caveat(summary)
    if warning:
        lines[2:2] = [f"> **{warning}**", ""]
    for category, entry in results.items():
        metric = entry["headline_metric"]
        if metric in entry["metrics"]:
            lines.append(table_row(category, metric, entry["metrics"][metric]))
    lines += ["", "## Other metrics", "",
              "Components of the complex score and diagnostics (concept_nll: captioner NLL, lower is better).",
              "", TABLE_HEADER]
    for category, entry in results.items():
        for metric, m in entry["metrics"].items():
            if metric != entry["headline_metric"]:
                lines.append(table_row(category, metric, m))
    lines += ["", "## Protocol", ""]
    lines += _protocol_lines(summary)
    if not world:
        lines += ["", "## Published figures (for reference; other detector and seeds)", "",
                  "| model | " + " | ".join(PUBLISHED["SDXL"]) + " |", "|---|" + "---|" * len(PUBLISHED["SDXL"])]
        for name, figures in PUBLISHED.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in figures.values()) + " |")
    lines += ["", "The grid (`grid.png`) shows, column by column, the same prompt and seed: base on top, tuned below.",
              ""]
    for i, item in enumerate(summary.get("grid", [])):
        verdict = item.get("verdict")
        judged = f" (judge: base {verdict['base']}; tuned {verdict['tuned']})" if verdict else ""
        lines.append(f"{i + 1}. {item['category']} #{item['prompt_idx']} seed {item['seed']}: {item['prompt']}{judged}")
    return "\n".join(lines) + "\n"


def _protocol_lines(summary: dict) -> list[str]:
    p = summary["protocol"]
    lines = [
        f"- evaluation code: stage version {summary['code']['stage_version']}, source sha256 "
        f"`{summary['code']['source_sha256'][:16]}`",
        f"- sampler: {p['scheduler']}, {p['num_inference_steps']} steps, guidance {p['guidance_scale']}, "
        f"{p['resolution']} px, {p['dtype']}",
        f"- images: {p['images_per_prompt']} per prompt, seeds {p['seeds'][0]}..{p['seeds'][-1]} (same for base and "
        f"tuned); prompts per category: " + ", ".join(f"{c} {n}" for c, n in p["prompts_per_category"].items()),
        f"- noun phrases: {p['parser']} parser; detector box threshold {p['detector_box_threshold']}",
        f"- bootstrap: {p['bootstrap_samples']} resamples of prompts, seed {p['bootstrap_seed']}",
    ]
    for role, model in summary["models"].items():
        lines.append(f"- {role}: `{model.get('name', '')}` ({model.get('fingerprint', '')})")
    for key, f in summary["prompt_files"].items():
        lines.append(f"- prompts {key}: `{f['file']}` sha256 `{f['sha256'][:16]}` ({f['lines']} lines)")
    return lines


def parse_table(markdown: str, section: str = "## Scores") -> list[dict]:
    """The rows of the first table after ``section`` (for checks that the report matches the data)."""
    lines = markdown.split(section, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| category"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(("category", "metric", "base", "tuned", "delta", "ci95", "pairs"), cells)))
    return rows


# ----------------------------------------------------------------------------------------------
# Grid


def grid_image(base: Sequence, tuned: Sequence, gap: int = 4, labels: dict[str, Sequence[str]] | None = None,
               min_width: int = 160):
    """Base images on the top row, tuned ones below, column by column (same prompt and seed).

    ``labels`` (``{"base": [...], "tuned": [...]}``, one short text per image, e.g. the shapes judge's
    verdict) are written under each image; small images are then enlarged (nearest) to ``min_width``
    so the text fits.
    """
    from PIL import Image, ImageDraw

    if len(base) != len(tuned) or not base:
        raise ValueError("the grid needs as many tuned images as base images, and at least one")
    scale = max(1, -(-min_width // base[0].size[0])) if labels else 1
    width, height = base[0].size[0] * scale, base[0].size[1] * scale
    text = 24 if labels else 0  # two lines of the default font under each image
    cell = height + text
    grid = Image.new("RGB", (len(base) * (width + gap) - gap, 2 * cell + gap), "white")
    draw = ImageDraw.Draw(grid)
    for column, (b, t) in enumerate(zip(base, tuned)):
        for row, (model, image) in enumerate((("base", b), ("tuned", t))):
            x, y = column * (width + gap), row * (cell + gap)
            grid.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (x, y))
            if labels:
                label = labels[model][column]
                draw.text((x + 2, y + height + 1), label[: width // 6], fill="black")
                draw.text((x + 2, y + height + 12), label[width // 6 : 2 * (width // 6)], fill="black")
    return grid
