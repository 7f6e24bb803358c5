"""One flow per stage, so any stage can be run or rerun alone (``comat-<stage>/...`` deployments).

Each flow builds the config, resolves its inputs from storage (the manifests of the stages it reads,
at the keys the config gives them; a missing one is an ``InputError`` naming the stage to run first)
and runs the stage's task. ``force=True`` recomputes the stage even when its manifest exists. The
flow returns the stage's artifact URL.

The sharded stages (``sdxl_prefinetune``, ``gan_gt``, ``masks``, ``evaluate``) also take
``part=[k, n]``: compute only the k-th of n contiguous slices of the stage's shards and return
without committing the stage. The parent flow's fan-out (``comat(..., parallelism=n)``) runs n such
parts of a stage's deployment side by side, then the stage once more without ``part`` to commit it.
A forced fan-out also passes ``staged``, the staging folder beside the old output where the parts
and the commit write; the commit promotes it, so the old output stays readable until then.
"""

from __future__ import annotations

from prefect import flow

from comat_core.errors import ComatError, ConfigError
from comat_core.config import ConfigRequest, build_config
from comat_core.preflight import check_this_machine
from flows._naming import stage_run_name
from tasks.logs import forward_to_runs
from flows.pipeline import refuse, require_storage, scrub_submitted_credentials
from tasks.stage import open_store, run_stage_task


def run_one(stage: str, config: ConfigRequest | None, force: bool, part: list[int] | None = None,
            staged: str | None = None):
    """Check the request (a refusal is one line, ``flows.pipeline.refuse``), then run the stage's task."""
    forward_to_runs()
    try:
        scrub_submitted_credentials(config)
        require_storage(config)
        cfg = build_config(config)
        if stage not in cfg.stage_order():
            raise ConfigError(f"stage {stage} is not part of preset {cfg.preset}'s pipeline "
                              f"({', '.join(cfg.stage_order())}); check sdxl_prefinetune.enabled / models.family")
        open_store(cfg).check_reachable()
        check_this_machine(cfg, [stage], [stage] if force or staged else None)  # its models (and GPU) when it computes
    except ComatError as e:
        return refuse(e)
    return run_stage_task(stage, cfg, force=force, part=part, staged=staged)


@flow(name="comat-world", flow_run_name=stage_run_name)
def world(config: ConfigRequest | None = None, force: bool = False) -> str:
    """A controlled world (world.kind: shapes): train its base model and captioner, or copy the shipped ones."""
    return run_one("world", config, force)


@flow(name="comat-prompts", flow_run_name=stage_run_name)
def prompts(config: ConfigRequest | None = None, force: bool = False) -> str:
    """Read, deduplicate and parse the prompt sources into prompts.parquet."""
    return run_one("prompts", config, force)


@flow(name="comat-sdxl-prefinetune", flow_run_name=stage_run_name)
def sdxl_prefinetune(config: ConfigRequest | None = None, force: bool = False, part: list[int] | None = None,
                     staged: str | None = None) -> str:
    """SDXL only: generate 1024-px images, resize to 512 and fine-tune the UNet on them."""
    return run_one("sdxl_prefinetune", config, force, part, staged)


@flow(name="comat-gan-gt", flow_run_name=stage_run_name)
def gan_gt(config: ConfigRequest | None = None, force: bool = False, part: list[int] | None = None,
           staged: str | None = None) -> str:
    """Generate the GAN ground-truth latents from the training prompts (sharded)."""
    return run_one("gan_gt", config, force, part, staged)


@flow(name="comat-masks", flow_run_name=stage_run_name)
def masks(config: ConfigRequest | None = None, force: bool = False, part: list[int] | None = None,
          staged: str | None = None) -> str:
    """Detect and segment each prompt's nouns in the gan_gt images (sharded)."""
    return run_one("masks", config, force, part, staged)


@flow(name="comat-train", flow_run_name=stage_run_name)
def train(config: ConfigRequest | None = None, force: bool = False) -> str:
    """CoMat LoRA fine-tuning (resumes from the latest complete checkpoint)."""
    return run_one("train", config, force)


@flow(name="comat-evaluate", flow_run_name=stage_run_name)
def evaluate(config: ConfigRequest | None = None, force: bool = False, part: list[int] | None = None,
             staged: str | None = None) -> str:
    """T2I-CompBench-style evaluation of the base and the fine-tuned model."""
    return run_one("evaluate", config, force, part, staged)


STAGE_FLOWS = {"world": world, "prompts": prompts, "sdxl_prefinetune": sdxl_prefinetune, "gan_gt": gan_gt,
               "masks": masks, "train": train, "evaluate": evaluate}
