"""Pool several CoMat training seeds of the shapes preset into one headline (run by hand).

One shapes run measures base vs CoMat for one training seed; its interval (the evaluate stage's
paired bootstrap over prompts) leaves out how much the result moves with the training seed. This
script reads several completed runs that differ only in ``train.seed`` and reports, per category
and judge metric, the pooled difference with an interval that includes the spread between seeds:

    python benchmarks/shapes_seeds.py --runs ROOT1 ROOT2 ROOT3 --out benchmarks/shapes/seeds [--label NAME]

Each ROOT is a storage root holding one completed shapes run (its ``evaluate/<key>/`` with a
manifest; when there are several, the one whose manifest is newest is taken and the script says so).

Per category and metric, base and tuned values are paired on (prompt, image seed). Per run, Δ is the
mean paired tuned − base; the pooled Δ is the mean of the runs' Δs. The 95 % interval is a two-level
percentile bootstrap (2,000 resamples, fixed seed): resample the runs (training seeds) with
replacement and the prompts with replacement (base and tuned paired, all images of a prompt
together); a resample's Δ is the mean over the chosen runs of their Δ on the chosen prompts.

The runs share their evaluation prompts and image seeds (prompts and seeds are crossed, not nested),
so by default one prompt resample is drawn per replicate and applied to every chosen run; with one
run, or with runs that agree exactly, the interval is then the evaluate stage's one-level interval.
``--nested`` draws a separate prompt resample for each chosen run instead (the scheme for runs with
independent prompt sets; with shared prompts it shrinks the prompt part of the interval by about
the square root of the number of runs). The JSON also holds the prompt-only interval (runs fixed).

Writes ``<out>/seeds.json`` (everything) and ``<out>/seeds.md`` (a scores table for binding,
colours, shapes, shape recall and validity, and the failure taxonomy), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORY_ORDER = ("shapes", "shapes_new", "shapes_three", "shapes_relation", "shapes_train", "shapes_single")
TABLE_METRICS = {"shapes": "binding", "shapes.colours": "colours", "shapes.shapes": "shapes",
                 "shapes.shape_recall": "shape recall", "shapes.validity": "validity"}
FAILURE_PREFIX = "shapes.failure."
SAMPLES = 2000
SEED = 0


@dataclass
class Run:
    """One storage root's evaluate output and what its train stage says about itself."""

    root: str
    key: str
    rows: list[dict]
    train_seed: int | None = None
    train_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"s{self.train_seed}" if self.train_seed is not None else Path(self.root).name


# ----------------------------------------------------------------------------------------------
# Reading the runs


def newest_evaluate(store, root: str) -> tuple[str, dict, list[str]]:
    """(key, manifest, notes) of the completed evaluate output with the newest manifest; exits when none."""
    done = {k: m for k in store.stage_keys("evaluate") if (m := store.read_manifest("evaluate", k)) is not None}
    if not done:
        sys.exit(f"error: {root} has no completed evaluate output (no evaluate/<key>/_manifest.json); "
                 "run the shapes preset to the end there first")
    key = max(done, key=lambda k: done[k].get("finished_at") or 0)
    notes = [f"{root}: {len(done)} completed evaluate outputs ({', '.join(sorted(done))}); took the newest, {key}"]
    return key, done[key], notes if len(done) > 1 else []


def train_info(store, evaluate_manifest: dict) -> tuple[int | None, float | None]:
    """The training seed and wall seconds from the train manifest the evaluate output names (None if absent)."""
    key = (evaluate_manifest.get("inputs", {}).get("train") or {}).get("key")
    manifest = store.read_manifest("train", key) if key else None
    if manifest is None:
        return None, None
    return (manifest.get("config", {}).get("section", {}).get("seed"), manifest.get("seconds"))


def split_run(arg: str) -> tuple[str, str | None]:
    """`ROOT` or `ROOT/evaluate/KEY` -> (root, key or None): a root holding ablations names its preset output."""
    head, sep, key = arg.rstrip("/").rpartition("/evaluate/")
    return (head, key) if sep and key and "/" not in key else (arg, None)


def load_run(arg: str) -> Run:
    """Read one run's evaluate output (its scores.parquet) and its train stage's facts.

    `arg` is a storage root (its newest completed evaluate output is taken) or `ROOT/evaluate/KEY`.
    """
    from comat_core.store.storage import ArtifactStore

    root, key = split_run(arg)
    store = ArtifactStore(root)
    if key is None:
        key, manifest, notes = newest_evaluate(store, root)
    else:
        manifest, notes = store.read_manifest("evaluate", key), []
        if manifest is None:
            sys.exit(f"error: {arg} is not a completed evaluate output (no _manifest.json)")
    rows = store.reader("evaluate", key).read_table("scores.parquet").to_pylist()
    seed, seconds = train_info(store, manifest)
    return Run(root, key, rows, seed, seconds, notes)


# ----------------------------------------------------------------------------------------------
# Pairing


def paired_values(rows: list[dict]) -> dict[tuple[str, str], dict[tuple, tuple[float, float]]]:
    """(category, metric) -> (prompt_idx, prompt, seed) -> (base, tuned), for images both models drew."""
    values: dict[tuple[str, str, str], dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        values[(r["model"], r["category"], r["metric"])][(r["prompt_idx"], r["prompt"], r["seed"])] = r["value"]
    out = {}
    for (model, category, metric), base in values.items():
        if model != "base":
            continue
        tuned = values.get(("tuned", category, metric), {})
        common = sorted(base.keys() & tuned.keys())
        if common:
            out[(category, metric)] = {k: (base[k], tuned[k]) for k in common}
    return out


def aligned(per_run: list[dict[tuple, tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Base (R, N), tuned (R, N), prompt group (N,) over the image pairs every run holds, and the pairs dropped."""
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    base = np.array([[p[k][0] for k in common] for p in per_run], dtype=np.float64).reshape(len(per_run), -1)
    tuned = np.array([[p[k][1] for k in common] for p in per_run], dtype=np.float64).reshape(len(per_run), -1)
    prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(k[:2] for k in common))}  # in prompt order
    groups = np.array([prompt_ids[k[:2]] for k in common], dtype=np.int64)
    return base, tuned, groups, sum(len(p) for p in per_run) - len(common) * len(per_run)


def prompt_sums(delta: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run and prompt, the sum of paired deltas (R, P), and the images per prompt (P,)."""
    n_prompts = int(groups.max()) + 1
    sums = np.zeros((delta.shape[0], n_prompts))
    for r in range(delta.shape[0]):
        sums[r] = np.bincount(groups, weights=delta[r], minlength=n_prompts)
    return sums, np.bincount(groups, minlength=n_prompts).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# The bootstrap


def two_level_ci(sums: np.ndarray, counts: np.ndarray, samples: int = SAMPLES, seed: int = SEED, *,
                 resample_runs: bool = True, nested: bool = False, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the pooled Δ: runs resampled with replacement, then prompts within them.

    ``sums`` (runs × prompts) holds each prompt's summed paired deltas, ``counts`` its images. A
    replicate's Δ is the mean over the chosen runs of Σ sums / Σ counts over the chosen prompts. Crossed
    (default): one prompt resample per replicate, shared by its runs; ``nested``: one per chosen run.
    ``resample_runs=False`` keeps every run once (the prompt-only interval). The prompt resample is
    drawn first, as the evaluate stage's ``bootstrap_ci`` draws it, so one run gives its interval exactly.
    """
    n_runs, n_prompts = sums.shape
    rng = np.random.default_rng(seed)
    prompt_picks = rng.integers(0, n_prompts, size=(samples, n_runs if nested else 1, n_prompts))
    run_picks = rng.integers(0, n_runs, size=(samples, n_runs)) if resample_runs else \
        np.broadcast_to(np.arange(n_runs), (samples, n_runs))
    per_run = sums[run_picks[:, :, None], prompt_picks].sum(-1) / counts[prompt_picks].sum(-1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(per_run.mean(axis=1), [tail, 100 - tail])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Summary


def summarise_metric(per_run: list[dict], nested: bool) -> dict | None:
    """Base, tuned, per-run and pooled Δ with intervals for one (category, metric); None without common pairs."""
    base, tuned, groups, dropped = aligned(per_run)
    if base.shape[1] == 0:
        return None
    sums, counts = prompt_sums(tuned - base, groups)
    deltas = sums.sum(axis=1) / counts.sum()
    return {
        "base": float(base.mean()), "tuned": float(tuned.mean()), "delta": float(deltas.mean()),
        "per_run": {"base": base.mean(axis=1).tolist(), "tuned": tuned.mean(axis=1).tolist(), "delta": deltas.tolist()},
        "ci95": list(two_level_ci(sums, counts, nested=nested)),
        "ci95_prompts_only": list(two_level_ci(sums, counts, resample_runs=False, nested=nested)),
        "base_differs_between_runs": bool(np.ptp(base, axis=0).max() > 0),
        "n_prompts": int(counts.size), "n_pairs_per_run": int(counts.sum()), "pairs_dropped": dropped,
    }


def ordered(names) -> list[str]:
    """Categories in the shapes world's order, any others after."""
    known = [c for c in CATEGORY_ORDER if c in names]
    return known + sorted(set(names) - set(known))


def summarise(runs: list[Run], nested: bool) -> dict:
    """Everything seeds.json holds: the runs, and per category and metric the pooled figures."""
    paired = [paired_values(run.rows) for run in runs]
    keys = set.intersection(*(set(p) for p in paired))
    results: dict[str, dict] = {}
    for category in ordered({c for c, _ in keys}):
        metrics = sorted(m for c, m in keys if c == category)
        entries = {m: summarise_metric([p[(category, m)] for p in paired], nested) for m in metrics}
        results[category] = {m: e for m, e in entries.items() if e is not None}
    runs_out = [{"root": r.root, "evaluate_key": r.key, "train_seed": r.train_seed,
                 "train_seconds": r.train_seconds, "label": r.label} for r in runs]
    scheme = {"samples": SAMPLES, "seed": SEED, "scheme": "nested" if nested else "crossed"}
    return {"runs": runs_out, "notes": [n for r in runs for n in r.notes], "bootstrap": scheme, "results": results}


# ----------------------------------------------------------------------------------------------
# Markdown


def signed(x: float) -> str:
    """``+0.123``; ``-0.000`` stays: a tiny negative bound still says the interval excludes 0."""
    return f"{x:+.3f}"


def fmt_delta(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{signed(entry['delta'])} [{signed(low)}, {signed(high)}]"


def score_rows(results: dict, labels: list[str]) -> list[str]:
    """The scores table: binding, colours, shapes, shape recall, validity in every category."""
    lines = ["| category | metric | base → CoMat | Δ [95 % CI] | per seed |", "|---|---|---|---|---|"]
    for category, metrics in results.items():
        for metric, name in TABLE_METRICS.items():
            if e := metrics.get(metric):
                seeds = ", ".join(f"{lab} {signed(d)}" for lab, d in zip(labels, e["per_run"]["delta"]))
                means = f"{e['base']:.3f} → {e['tuned']:.3f}"
                lines.append(f"| {category} | {name} | {means} | {fmt_delta(e)} | {seeds} |")
    return lines


def taxonomy_rows(results: dict) -> list[str]:
    """The failure taxonomy: each kind's share of images, base → tuned, pooled over runs (unseen kinds left out)."""
    lines = ["| category | failure kind | base → CoMat | Δ [95 % CI] |", "|---|---|---|---|"]
    for category, metrics in results.items():
        for metric, e in metrics.items():
            seen = max(e["per_run"]["base"] + e["per_run"]["tuned"]) > 0
            if metric.startswith(FAILURE_PREFIX) and seen:
                kind = metric.removeprefix(FAILURE_PREFIX).replace("_", " ")
                lines.append(f"| {category} | {kind} | {e['base']:.3f} → {e['tuned']:.3f} | {fmt_delta(e)} |")
    return lines


def render_markdown(summary: dict, label: str | None) -> str:
    """seeds.md: the runs, the scores table, the taxonomy table, counts and notes."""
    runs, results = summary["runs"], summary["results"]
    title = f"# Shapes preset, base vs CoMat over {len(runs)} training seeds" + (f": {label}" if label else "")
    lines = [title, "", "| run | root | evaluate key | train seed | train wall |", "|---|---|---|---|---|"]
    for r in runs:
        wall = f"{r['train_seconds']:.0f} s" if r["train_seconds"] is not None else "?"
        lines.append(f"| {r['label']} | {r['root']} | {r['evaluate_key']} | {r['train_seed']} | {wall} |")
    scheme = summary["bootstrap"]["scheme"]
    lines += ["", "## Scores", "", f"Δ = tuned − base, paired on prompt and image seed, mean of the runs' Δs; 95 % "
              f"two-level bootstrap over runs and prompts ({SAMPLES} resamples, {scheme}).", ""]
    lines += score_rows(results, [r["label"] for r in runs])
    lines += ["", "## Failure taxonomy (share of images)", ""] + taxonomy_rows(results) + ["", "## Counts", ""]
    for category, metrics in results.items():
        e = metrics.get("shapes") or next(iter(metrics.values()))
        lines.append(f"- {category}: {len(runs)} runs × {e['n_prompts']} prompts × "
                     f"{e['n_pairs_per_run'] / e['n_prompts']:g} images ({e['n_pairs_per_run']} pairs per run)")
    lines += [f"- note: {n}" for n in notes(summary)]
    return "\n".join(lines) + "\n"


def notes(summary: dict) -> list[str]:
    """What a reader should know: chosen outputs, dropped pairs, base scores that differ, repeated seeds."""
    out = list(summary["notes"])
    seeds = [r["train_seed"] for r in summary["runs"]]
    if len(set(seeds)) < len(seeds):
        out.append(f"training seeds repeat ({seeds}): these runs are not independent seeds")
    for category, metrics in summary["results"].items():
        if any(e["pairs_dropped"] for e in metrics.values()):
            out.append(f"{category}: image pairs not held by every run were left out")
        if any(e["base_differs_between_runs"] for e in metrics.values()):
            out.append(f"{category}: the base model's scores differ between runs (not the same world or prompts?)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="ROOT",
                        help="storage roots, each holding one completed shapes run (one per training seed); "
                             "ROOT/evaluate/KEY picks one evaluate output where a root holds several")
    parser.add_argument("--out", type=Path, required=True, help="folder for seeds.json and seeds.md")
    parser.add_argument("--label", default=None, help="a name for the table's title")
    parser.add_argument("--nested", action="store_true", help="a separate prompt resample per chosen run")
    args = parser.parse_args(argv)
    runs = [load_run(root) for root in args.runs]
    for run in runs:
        wall = f"{run.train_seconds:.0f} s" if run.train_seconds is not None else "?"
        print(f"{run.root}: evaluate {run.key}, train seed {run.train_seed}, train wall {wall}", file=sys.stderr)
    summary = summarise(runs, args.nested)
    text = render_markdown(summary, args.label)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "seeds.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
