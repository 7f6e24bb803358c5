"""The catalogue of evaluation metrics: imports every built-in metric module and answers which apply.

Each metric module registers its classes into ``registry.METRICS`` when imported; importing them
here (and nowhere in ``registry``) keeps the dependency one way: metric modules → registry,
catalogue → metric modules. To add a metric, write it (see ``registry.Metric``) and import it here.
"""

from __future__ import annotations

from comat_core.errors import ConfigError
from comat_core.stages.evaluate import clip_score, complex, coverage, shapes, spatial, vqa  # noqa: F401 (they register)
from comat_core.stages.evaluate.registry import METRICS, EvalSample, Metric, MetricEnv, ScoringModels, Values, chunks, register

__all__ = ["METRICS", "EvalSample", "Metric", "MetricEnv", "ScoringModels", "Values", "chunks", "register",
           "metrics_for", "headline_metric", "higher_is_better"]


def load_builtin_metrics() -> dict[str, type[Metric]]:
    """The registry, with every built-in metric module imported above."""
    return METRICS


def metrics_for(category: str) -> list[type[Metric]]:
    """The registered metrics that score images of ``category``, in registration order."""
    return [m for m in load_builtin_metrics().values() if category in m.categories]


def headline_metric(category: str) -> str:
    """The name of the metric whose mean is the category's T2I-CompBench score."""
    found = [m.name for m in load_builtin_metrics().values() if category in m.headline_for]
    if len(found) != 1:
        raise ConfigError(f"category {category!r} needs exactly one headline metric, found {found or 'none'}")
    return found[0]


def higher_is_better(metric: str) -> bool:
    """Direction of a metric or of one of its components (``complex.spatial`` follows ``complex``)."""
    registry = load_builtin_metrics()
    cls = registry.get(metric) or registry.get(metric.split(".", 1)[0])
    return True if cls is None else cls.higher_is_better
