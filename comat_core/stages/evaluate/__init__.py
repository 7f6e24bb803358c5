"""The ``evaluate`` stage: T2I-CompBench metrics for the base and the tuned model, side by side.

Modules: ``metrics`` (the Metric interface, registry and scoring models), one module per metric
(``vqa``, ``spatial``, ``clip_score``, ``complex``, ``coverage``), ``routing`` (which components score
a complex prompt), ``prompt_sets`` (evaluation prompt files), ``generate`` (seeded generation),
``report`` (summary, bootstrap, markdown, grid) and ``stage`` (the stage function ``run(ctx)``).
"""

from comat_core.stages.evaluate.metrics import METRICS, EvalSample, Metric, MetricEnv, ScoringModels, headline_metric, metrics_for, register

__all__ = ["METRICS", "EvalSample", "Metric", "MetricEnv", "ScoringModels", "headline_metric", "metrics_for",
           "register"]
