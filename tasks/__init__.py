"""Thin Prefect tasks around ``comat_core.stages.registry.run_stage`` (one per stage; see ``tasks.stage``)."""

from tasks.stage import STAGE_TASKS, config_payload, run_stage_task, stage_task

__all__ = ["STAGE_TASKS", "config_payload", "run_stage_task", "stage_task"]
