"""comat_core: the CoMat method and its pipeline as plain functions (no Prefect here).

Layers, from the bottom up (a module imports only its own layer and those below; ``tests/test_layout.py``
checks it):

* ``errors.py``: the error types;
* ``store/``: the artifact store contract (stage folders, manifests written last, shards, checkpoints);
* ``config.py``, ``runtime.py``, ``progress.py``: typed configuration, device/precision, progress lines;
* ``models/``: model loading by Hub id, folder or ``tiny://`` name, the tiny zoo, backbones, LoRA, generation;
* ``method/``: CoMat itself (sampler, attention capture, losses, discriminator, trainer);
* ``worlds/``: controlled worlds for measuring the method (the shapes world);
* ``stages/``: the stage registry and one module or package per pipeline stage;
* ``preflight.py``, ``export.py``: the checks run before any work, and the export of a trained LoRA.
"""

__version__ = "0.1.0"
