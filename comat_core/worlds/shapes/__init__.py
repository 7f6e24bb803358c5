"""The shapes world: renderer, judge, vocabulary and splits, captioner and base model builders (no Prefect).

Modules: ``vocab`` (words, colours, prompt parser), ``render`` (scenes, images, exact masks,
captions), ``judge`` (the oracle: segment and score), ``splits`` (which pairs the base model sees,
CoMat vs held-out prompts), ``data`` (rendered datasets), ``base_model`` and ``captioner``
(training), ``build`` (``build_world``, ``WorldConfig``).

``PRETRAINED`` holds the world built by ``build_world(WorldConfig())`` (seed 0), shipped with the
package so that a run can start from it: ``base/`` (diffusers pipeline), ``captioner/`` (BLIP) and
``world.json``.
"""

from pathlib import Path

PRETRAINED = Path(__file__).parent / "pretrained"
