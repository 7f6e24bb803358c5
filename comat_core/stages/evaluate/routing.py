"""Which components score each complex prompt: the routing files' prompt lists, matched as the reference does.

A module of its own, importing no other evaluate module: the prompt sets build a ``ComplexRouting``,
``registry.MetricEnv`` carries it, and the ``complex`` metric reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

COMPONENTS = ("attribute", "spatial", "action")
ROUTES = {
    "spatial": ("attribute", "spatial"),
    "action": ("attribute", "action"),
    "spatial_action": ("attribute", "spatial", "action"),
}


def routing_key(prompt: str) -> str:
    """How the reference matches prompts across files: lower-cased, up to the first "."."""
    return prompt.strip().split(".")[0].lower()


@dataclass(frozen=True)
class ComplexRouting:
    """Which components score each complex prompt, from the routing files' prompt lists."""

    spatial: frozenset[str]
    action: frozenset[str]

    @classmethod
    def from_lists(cls, spatial: Sequence[str], action: Sequence[str]) -> "ComplexRouting":
        return cls(frozenset(map(routing_key, spatial)), frozenset(map(routing_key, action)))

    def route(self, prompt: str) -> str:
        key = routing_key(prompt)
        if key in self.spatial:
            return "spatial"
        if key in self.action:
            return "action"
        return "spatial_action"

    def components(self, prompt: str) -> tuple[str, ...]:
        return ROUTES[self.route(prompt)]
