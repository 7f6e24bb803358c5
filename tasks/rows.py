"""Evaluation results as table rows, without Prefect: shared by the UI artifacts and by ``comat run``'s
closing lines (a fully cached run prints them without importing Prefect)."""

from __future__ import annotations

import math


def _clean(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else float(f"{value:.6g}")
    return value if isinstance(value, (int, str, bool)) or value is None else str(value)


def result_rows(results: dict) -> list[dict]:
    """The evaluate stage's ``results`` ({category: {headline_metric, metrics: {metric: {base, tuned,
    delta, ci95, n_pairs}}}}) as one row per category and metric; [] if it has another shape."""
    rows = []
    for category, entry in results.items():
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict):
            return []
        for metric, m in metrics.items():
            if not isinstance(m, dict):
                return []
            ci = m.get("ci95") if isinstance(m.get("ci95"), (list, tuple)) and len(m["ci95"]) == 2 else (None, None)
            rows.append({"category": category, "metric": metric, "headline": metric == entry.get("headline_metric"),
                         "base": _clean(m.get("base")), "tuned": _clean(m.get("tuned")), "delta": _clean(m.get("delta")),
                         "ci95_low": _clean(ci[0]), "ci95_high": _clean(ci[1]), "pairs": _clean(m.get("n_pairs"))})
    return rows
