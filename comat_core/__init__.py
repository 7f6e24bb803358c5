"""comat_core: the CoMat method and its pipeline as plain functions (no Prefect here).

Folders, from the bottom up:

* ``config.py``, ``errors.py``, ``runtime.py``, ``preflight.py``: typed configuration, the error types,
  device/precision, and the checks run before any work;
* ``store/``: the artifact store contract (stage folders, manifests written last, shards, checkpoints);
* ``models/``: model loading by Hub id, folder or ``tiny://`` name, the tiny zoo, backbones, LoRA, generation;
* ``method/``: CoMat itself (sampler, attention capture, losses, discriminator, trainer);
* ``stages/``: the stage registry and one module or package per pipeline stage;
* ``worlds/``: controlled worlds for measuring the method (the shapes world).
"""

__version__ = "0.1.0"
