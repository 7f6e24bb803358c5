"""The metric interface of the evaluate stage, the registry metrics add themselves to, and the scoring models.

A metric scores generated images against their prompts. It declares which evaluation categories it
applies to and for which it is the category's headline number (the T2I-CompBench score), and returns
one value per image — or several named values (``complex`` also records its components). The stage
asks the registry which metrics apply to a category, so adding a metric is: write a subclass of
:class:`Metric`, decorate it with :func:`register`, and import its module in ``metrics.py`` (the catalogue).
This module imports no metric module, so metric modules import it without a circle.

Scoring models (BLIP-VQA, CLIP, Grounding DINO, the BLIP captioner) are loaded once, on first use,
by :class:`ScoringModels`, frozen and in fp32: the metrics are small next to the generator, and fp32
keeps the scores independent of the GPU's precision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from comat_core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from comat_core.config import EvaluateConfig, ModelsConfig
    from comat_core.stages.evaluate.routing import ComplexRouting  # noqa: F401 (annotation only)

Values = list[float | None]  # one per image; None: the metric does not apply to that image


@dataclass(frozen=True)
class EvalSample:
    """One evaluation image: which model drew it, for which prompt of which category, from which seed."""

    model: str  # "base" | "tuned"
    category: str
    prompt_idx: int
    prompt: str
    seed: int

    @property
    def image_path(self) -> str:
        return f"images/{self.model}/{self.category}/{self.prompt_idx}-{self.seed}.png"


class ScoringModels:
    """The frozen scoring models, each loaded on first use and kept for the stage's lifetime."""

    def __init__(self, models: "ModelsConfig", device: torch.device | str = "cpu"):
        self.names = models
        self.device = torch.device(device)

    @cached_property
    def vqa(self):
        from comat_core.models.loader import load_vqa

        return load_vqa(self.names.vqa, dtype=torch.float32, device=self.device, field="models.vqa")

    @cached_property
    def clip(self):
        from comat_core.models.loader import load_clip

        return load_clip(self.names.clip, dtype=torch.float32, device=self.device, field="models.clip")

    @cached_property
    def detector(self):
        from comat_core.models.loader import load_grounding_dino

        return load_grounding_dino(self.names.grounding_dino, dtype=torch.float32, device=self.device,
                                   field="models.grounding_dino")

    @cached_property
    def captioner(self):
        from comat_core.models.loader import load_captioner

        return load_captioner(self.names.captioner, dtype=torch.float32, device=self.device,
                              field="models.captioner")


@dataclass
class MetricEnv:
    """What a metric may use: the scoring models, the evaluate settings, the complex-prompt routing."""

    models: ScoringModels
    settings: "EvaluateConfig"
    routing: "ComplexRouting | None" = None
    cache: dict = field(default_factory=dict)  # per-stage memo shared by metrics (e.g. parsed prompts)


class Metric(ABC):
    """Scores images against their prompts; subclasses set the class attributes and ``score``."""

    name: ClassVar[str]
    categories: ClassVar[tuple[str, ...]]  # categories whose images it scores
    headline_for: ClassVar[tuple[str, ...]] = ()  # categories whose T2I-CompBench number it is
    higher_is_better: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __init__(self, env: MetricEnv):
        self.env = env

    @abstractmethod
    def score(self, images: Sequence["Image"], samples: Sequence[EvalSample]) -> dict[str, Values]:
        """``{metric name: one value per image}``; the first key is ``self.name``."""


METRICS: dict[str, type[Metric]] = {}


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator: add a metric to the registry (names are unique)."""
    if cls.name in METRICS and METRICS[cls.name] is not cls:
        raise ConfigError(f"two metrics are named {cls.name!r}: {METRICS[cls.name].__qualname__} and {cls.__qualname__}")
    METRICS[cls.name] = cls
    return cls


def chunks(n: int, size: int) -> list[slice]:
    """Slices that cover ``range(n)`` in pieces of at most ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]
