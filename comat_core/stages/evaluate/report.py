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
import textwrap
from collections import defaultdict
from dataclasses import dataclass
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
                  "saw (the headline); shapes_new: with a colour-shape pair no training prompt holds; shapes_three: "
                  "three objects; shapes_relation: two objects and a relation; shapes_train: training prompts; "
                  "shapes_single: one object.", "", TABLE_HEADER]
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
    if world:
        lines += taxonomy_lines(results)
    lines += ["", "## Protocol", ""]
    lines += _protocol_lines(summary)
    if not world:
        lines += ["", "## Published figures (for reference; other detector and seeds)", "",
                  "| model | " + " | ".join(PUBLISHED["SDXL"]) + " |", "|---|" + "---|" * len(PUBLISHED["SDXL"])]
        for name, figures in PUBLISHED.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in figures.values()) + " |")
    lines += ["", *picture_lines(), "The grid (`grid.png`) shows, column by column, the same prompt and seed: "
              "base on top, tuned below.", ""]
    for i, item in enumerate(summary.get("grid", [])):
        verdict = item.get("verdict")
        judged = f" (judge: base {verdict['base']}; tuned {verdict['tuned']})" if verdict else ""
        lines.append(f"{i + 1}. {item['category']} #{item['prompt_idx']} seed {item['seed']}: {item['prompt']}{judged}")
    return "\n".join(lines) + "\n"


def taxonomy_lines(results: dict) -> list[str]:
    """The judge's failure taxonomy per category: each kind's share of the images, base -> tuned."""
    kinds = []
    for entry in results.values():
        kinds += [m.split(".failure.", 1)[1] for m in entry["metrics"] if ".failure." in m and
                  m.split(".failure.", 1)[1] not in kinds]
    if not kinds:
        return []
    lines = ["", "## What went wrong (the judge's failure taxonomy)", "",
             "Share of images of each kind, base → tuned (the first that applies: correct; unrecognisable "
             "blob; an object missing; extra objects; a shape wrong; then, shapes right: colours swapped, "
             "one colour on all, a colour wrong).", "",
             "| category | " + " | ".join(k.replace("_", " ") for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for category, entry in results.items():
        cells = []
        for kind in kinds:
            m = next((v for name, v in entry["metrics"].items() if name.endswith(f".failure.{kind}")), None)
            cells.append("–" if m is None else f"{fmt_share(m['base'])} → {fmt_share(m['tuned'])}")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def fmt_share(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f} %"


CHART, GRID = "chart.png", "grid.png"


def picture_lines() -> list[str]:
    """The chart and the grid, embedded (both are written beside ``report.md``)."""
    return ["## Pictures", "", f"![base vs tuned per category, with the 95% bootstrap interval of the difference]({CHART})",
            "", f"![grid: base (top) and tuned (bottom) per prompt]({GRID})", ""]


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


@dataclass(frozen=True)
class GridLayout:
    """Where everything of the labelled grid goes: a header per column (category, prompt), a margin
    with the row names (base, tuned), image cells, and optional per-image labels under each image."""

    scale: int
    cell_w: int
    cell_h: int
    margin: int  # left: "base" / "tuned"
    header_h: int
    label_h: int  # under each image (the judge's verdict), 0 without
    headers: tuple[tuple[str, ...], ...]  # the wrapped header lines of each column
    size: tuple[int, int]


CHAR_W, LINE_H = 6, 11  # Pillow's default bitmap font


def _wrap(text: str, chars: int, lines: int) -> tuple[str, ...]:
    out = textwrap.wrap(text, max(chars, 4)) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(chars - 1, 3)] + "…"
    return tuple(out)


def grid_layout(columns: Sequence[str], image_size: tuple[int, int], with_labels: bool = False, gap: int = 4,
                min_width: int = 160, header_lines: int = 4) -> GridLayout:
    """The grid's geometry for ``columns`` (one header text per column) of ``image_size`` images;
    small images are enlarged (nearest) to ``min_width`` so the header text fits above them."""
    scale = max(1, -(-min_width // image_size[0]))
    cell_w, cell_h = image_size[0] * scale, image_size[1] * scale
    headers = tuple(_wrap(text, cell_w // CHAR_W, header_lines) for text in columns)
    header_h = max(len(h) for h in headers) * LINE_H + 6
    margin, label_h = 44, (2 * LINE_H + 2 if with_labels else 0)
    width = margin + len(columns) * (cell_w + gap) - gap
    height = header_h + 2 * (cell_h + label_h) + gap
    return GridLayout(scale, cell_w, cell_h, margin, header_h, label_h, headers, (width, height))


def grid_headers(items: Sequence[dict]) -> list[str]:
    """A column's header: ``category #prompt (seed): prompt``."""
    return [f"{it['category']} #{it['prompt_idx']} seed {it['seed']}: {it['prompt']}" for it in items]


def grid_image(base: Sequence, tuned: Sequence, gap: int = 4, labels: dict[str, Sequence[str]] | None = None,
               min_width: int = 160, headers: Sequence[str] | None = None):
    """Base images on the top row, tuned ones below, column by column (same prompt and seed).

    ``headers`` (one per column: category and prompt, ``grid_headers``) are written above each column
    and the rows are named; ``labels`` (``{"base": [...], "tuned": [...]}``, one short text per image,
    e.g. the shapes judge's verdict) are written under each image. See ``grid_layout``.
    """
    from PIL import Image, ImageDraw

    if len(base) != len(tuned) or not base:
        raise ValueError("the grid needs as many tuned images as base images, and at least one")
    layout = grid_layout(list(headers or [""] * len(base)), base[0].size, bool(labels), gap, min_width)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    chars = layout.cell_w // CHAR_W
    for column, (b, t) in enumerate(zip(base, tuned)):
        x = layout.margin + column * (layout.cell_w + gap)
        for k, line in enumerate(layout.headers[column]):
            draw.text((x + 1, 2 + k * LINE_H), line, fill="black")
        for row, (model, image) in enumerate((("base", b), ("tuned", t))):
            y = layout.header_h + row * (layout.cell_h + layout.label_h + gap)
            if column == 0:
                draw.text((2, y + layout.cell_h // 2 - LINE_H // 2), model, fill="black")
            grid.paste(image.convert("RGB").resize((layout.cell_w, layout.cell_h), Image.NEAREST), (x, y))
            if labels:
                label = labels[model][column]
                draw.text((x + 2, y + layout.cell_h + 1), label[:chars], fill="black")
                draw.text((x + 2, y + layout.cell_h + 1 + LINE_H), label[chars: 2 * chars], fill="black")
    return grid


# ----------------------------------------------------------------------------------------------
# Chart


def chart_rows(results: dict) -> list[dict]:
    """One row per category with its headline metric: base and tuned means, delta and its 95% CI."""
    rows = []
    for category, entry in results.items():
        m = entry["metrics"].get(entry["headline_metric"])
        if m and m["base"] is not None and m["tuned"] is not None:
            rows.append({"category": category, "metric": entry["headline_metric"], "base": m["base"],
                         "tuned": m["tuned"], "delta": m["delta"], "ci95": m["ci95"], "n_pairs": m["n_pairs"]})
    return rows


def chart_image(results: dict):
    """Base vs tuned per category (headline metric): two bars on the left, the paired difference
    with its 95% bootstrap interval on the right (a dot and a whisker about a zero line). Pillow only."""
    from PIL import Image, ImageDraw

    rows = chart_rows(results)
    row_h, top, left, bars_w, gap, delta_w = 34, 40, 150, 260, 30, 260
    width, height = left + bars_w + gap + delta_w + 20, top + max(len(rows), 1) * row_h + 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), "base vs tuned (headline metric per category)", fill="black")
    d.text((left + bars_w + gap, 6), "tuned - base, 95% bootstrap interval", fill="black")
    colors = {"base": (127, 127, 127), "tuned": (31, 119, 180)}
    d.rectangle((left, 24, left + 8, 30), fill=colors["base"])
    d.text((left + 12, 22), "base", fill="black")
    d.rectangle((left + 60, 24, left + 68, 30), fill=colors["tuned"])
    d.text((left + 72, 22), "tuned", fill="black")
    if not rows:
        d.text((8, top + 8), "no scores", fill=(120, 120, 120))
        return img
    vmax = max(max(abs(r["base"]), abs(r["tuned"])) for r in rows) or 1.0
    spread = max(abs(v) for r in rows for v in [r["delta"] or 0.0] + list(r["ci95"] or [])) or 1.0
    x_zero = left + bars_w + gap + delta_w // 2
    half = delta_w // 2 - 10
    bottom = top + len(rows) * row_h
    d.line((x_zero, top - 4, x_zero, bottom), fill=(160, 160, 160))
    d.text((x_zero - half, bottom + 4), f"{-spread:+.3g}", fill="black")
    d.text((x_zero - 3, bottom + 4), "0", fill="black")
    d.text((x_zero + half - 30, bottom + 4), f"{spread:+.3g}", fill="black")
    d.text((left, bottom + 4), "0", fill="black")
    d.text((left + bars_w - 30, bottom + 4), f"{vmax:.3g}", fill="black")
    for i, r in enumerate(rows):
        y = top + i * row_h
        d.text((8, y + 4), r["category"][:22], fill="black")
        d.text((8, y + 16), f"{r['metric'][:16]}, {r['n_pairs']} pairs", fill=(90, 90, 90))
        for k, model in enumerate(("base", "tuned")):
            value = r[model]
            yy = y + 4 + k * 13
            d.rectangle((left, yy, left + max(1, int(abs(value) / vmax * bars_w)), yy + 10), fill=colors[model])
            d.text((left + 4 + int(abs(value) / vmax * bars_w), yy - 1), f"{value:.3f}", fill="black")
        yc = y + row_h // 2 - 2
        if r["ci95"]:
            lo, hi = (x_zero + int(v / spread * half) for v in r["ci95"])
            d.line((lo, yc, hi, yc), fill="black", width=2)
            d.line((lo, yc - 5, lo, yc + 5), fill="black")
            d.line((hi, yc - 5, hi, yc + 5), fill="black")
        if r["delta"] is not None:
            xc = x_zero + int(r["delta"] / spread * half)
            d.ellipse((xc - 4, yc - 4, xc + 4, yc + 4), fill=colors["tuned"])
    return img
