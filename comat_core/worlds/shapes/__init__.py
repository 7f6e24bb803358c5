"""The shapes world: renderer, judge, vocabulary and splits, captioner and base model builders (no Prefect).

Modules: ``vocab`` (words, colours, prompt parser), ``render`` (scenes, images, exact masks,
captions), ``judge`` (the oracle: segment and score), ``splits`` (which pairs the base model sees,
CoMat vs held-out prompts), ``data`` (rendered datasets), ``base_model`` and ``captioner``
(training), ``settings`` (``WorldConfig``), ``build`` (``build_world``), ``measure`` (the base model
per prompt category and the world's gates).

``PRETRAINED`` holds the world built by ``build_world(WorldConfig())`` (seed 0), shipped with the
package so that a run can start from it: ``base/`` (diffusers pipeline), ``captioner/`` (BLIP) and
``world.json``.

The world plugs into the pipeline from outside this package, in these files and nowhere else (the
stages stay the real pipeline's; each plug-in is chosen by configuration, ``world.kind: shapes`` and
the ``shapes`` preset in ``comat_core/config.py``):

* ``comat_core/stages/world.py``: the ``world`` stage; builds the world (or copies ``PRETRAINED``)
  and resolves the ``world://base`` and ``world://captioner`` model names of the other stages;
* ``comat_core/stages/masks/shapes.py``: the ``shapes`` masks backend (``masks.backend: shapes``,
  picked in ``stages/masks/factory.py``): the judge as the segmenter, in place of Grounding DINO + SAM;
* ``comat_core/stages/evaluate/shapes.py``: the judge as an evaluation metric (categories ``shapes``,
  ``shapes_new``, ``shapes_three``, ``shapes_relation``, ``shapes_train``, ``shapes_single``: binding,
  colours, shapes, validity, failure kinds), which the
  evaluate stage's report and grids use when every category is a shapes one;
* ``comat_core/data/shapes/``: the preset's prompt files (training prompts and the three evaluation
  categories), written by ``prompt_files`` from the world's split.
"""

from pathlib import Path

PRETRAINED = Path(__file__).parent / "pretrained"
