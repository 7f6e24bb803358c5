"""The ``train`` stage: CoMat fine-tuning of the configured model (the method in ``comat_core.method``).

Inputs: ``prompts`` (texts and entity spans), ``gan_gt`` (one ground-truth latent per prompt, the
discriminator's "real" data and the Mixed Latent start points), ``masks`` (per-entity object masks
for attribute concentration) and, for SDXL, ``sdxl_prefinetune`` (its ``unet/`` folder replaces the
generator's UNet). Trains on the prompts that have a ground-truth latent and writes
``checkpoints/``, ``samples/``, ``lora/``, ``metrics.parquet`` (see ``method/trainer.py``) and the
curves drawn from it, ``curves.png`` (``curves.py``). A rerun
of an interrupted stage resumes from its latest complete checkpoint. With ``train.num_processes > 1``
the training runs data parallel under ``accelerate launch`` and this stage waits (``launch.py``).
"""

from __future__ import annotations

from comat_core.stages.registry import StageContext
from comat_core.stages.train.curves import curves_image
from comat_core.stages.train.inputs import train_in_process
from comat_core.stages.train.launch import launched, run_launched


def run(ctx: StageContext) -> dict:
    """Stage entry point: in this process, or under ``accelerate launch`` with ``train.num_processes > 1``."""
    summary = run_launched(ctx) if launched(ctx.cfg) else train_in_process(ctx)
    write_curves(ctx)
    return summary


def write_curves(ctx: StageContext) -> None:
    """``curves.png`` from the ``metrics.parquet`` the training wrote (one row per step)."""
    import io

    import pyarrow.parquet as pq

    if "metrics.parquet" in ctx.writer.files:
        rows = pq.read_table(io.BytesIO(ctx.store.read_bytes(ctx.writer.path("metrics.parquet")))).to_pylist()
        ctx.writer.put_image("curves.png", curves_image(rows))
