"""Data-parallel training over several processes (GPUs, or CPU slots with gloo) under ``accelerate launch``.

With ``train.num_processes == 1`` the train stage trains in its own process. With more, the stage runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines M
        --mixed_precision MODE [--machine_rank R --main_process_ip IP --main_process_port PORT]
        -m comat_core.stages.train.launch --request <scratch>/launch/request.json

(accelerate's torchrun launcher: one process per GPU; on a machine without GPUs each process trains
on the CPU and the process group uses gloo) and waits. Every process rebuilds the config and the
artifact store from the request, checks that it computes the same stage key, and runs
``method.trainer.train`` on the stage's folder: the trainer averages the LoRA gradients over the processes
and only the main process writes. When training is done the main process commits the shard
``launch-result`` listing every file of the stage, with the summary as its meta; the stage call
verifies it (sha256 of every file), takes over its file list and summary, and ``run_stage``
commits the stage manifest as for an in-process run.

Progress and logs: the main process prints ``comat-progress <done> <total> <message>`` lines, which the
stage call forwards to its progress callback (the console bar or lines, and the Prefect progress
artifact), and its ``comat`` log records (the step lines) as ``comat-log <json>`` lines, which the stage
call logs under the same logger (the console, the log file and the Prefect run's logs); other lines pass
through. Every process runs with the libraries' progress bars off (model loading would draw one bar
per process and model).

Resuming: a checkpoint holds the step and the position in the global sample order. The stage key
holds the micro-batches per step, not the process layout (``TrainConfig.key_dump``), and the trainer
seeds each micro-batch by its slot in the global batch, so a run interrupted with 2 processes x 1
micro-batch resumes with 1 process x 2 (``train.gradient_accumulation_steps=2``): same key, same
folder, same sample order, same random draws. A different global batch is a different
optimisation, hence another key: it starts from step 0 in its own folder.

Several machines: machine 0 runs the train stage (and commits it); each other machine joins the
same run with ``python -m comat_core.stages.train.launch join --config '<config request JSON>'`` whose
config differs only in ``train.machine_rank``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from comat_core.config import ComatConfig
from comat_core.errors import ConfigError, IntegrityError

STAGE = "train"
MODULE = "comat_core.stages.train.launch"
RESULT_SHARD = "launch-result"
PROGRESS = "comat-progress"
LOG = "comat-log"
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder that holds comat_core/


# ----------------------------------------------------------------------------------------------
# The stage side: launch, wait, take over the result


def launched(cfg: ComatConfig) -> bool:
    """Whether training runs under ``accelerate launch`` (more than one process or machine)."""
    return cfg.train.num_processes > 1 or cfg.train.num_machines > 1


def check_layout(cfg: ComatConfig) -> None:
    """The process layout must be launchable: whole processes per machine, a rank, a rendezvous address."""
    tc = cfg.train
    if tc.num_processes % tc.num_machines:
        raise ConfigError(f"train.num_processes ({tc.num_processes}) counts the processes of all machines and must be "
                          f"a multiple of train.num_machines ({tc.num_machines})")
    if tc.machine_rank >= tc.num_machines:
        raise ConfigError(f"train.machine_rank ({tc.machine_rank}) must be below train.num_machines ({tc.num_machines})")
    if tc.num_machines > 1 and not tc.main_process_ip:
        raise ConfigError("train.num_machines > 1 needs train.main_process_ip: the address of machine 0")


def launch_command(cfg: ComatConfig, request: Path) -> list[str]:
    """The ``accelerate launch`` command line that trains the request on this machine's processes."""
    import torch

    tc = cfg.train
    # the trainer resolves "auto" itself (without touching CUDA here); the flag only sets a default
    mode = cfg.runtime.mixed_precision if torch.cuda.is_available() and cfg.runtime.mixed_precision != "auto" else "no"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(tc.num_processes), "--num_machines", str(tc.num_machines),
           "--mixed_precision", mode, "--dynamo_backend", "no"]
    if tc.num_machines > 1:
        cmd += ["--machine_rank", str(tc.machine_rank), "--main_process_ip", str(tc.main_process_ip),
                "--main_process_port", str(tc.main_process_port)]
    else:
        cmd += ["--main_process_port", "0"]  # any free port: several trainings may share a machine
    return cmd + ["-m", MODULE, "--request", str(request)]


def write_request(cfg: ComatConfig, key: str, folder: Path, hooks: dict | None = None, output: str = "") -> Path:
    """The request every process reads: the full config, the stage key, a local scratch folder, test hooks,
    and the store folder the output goes to (``output``: the key's, or a forced run's staging folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    request = {"config": {"preset": cfg.preset, "values": cfg.model_dump(mode="json", exclude={"preset"})},
               "key": key, "scratch": str(folder), "output": output or key,
               "hooks": {k: v for k, v in (hooks or {}).items() if isinstance(v, (bool, int, float, str))}}
    path = folder / "request.json"
    path.write_text(json.dumps(request, indent=2), encoding="utf-8")
    return path


def run_launched(ctx) -> dict:
    """The train stage with more than one process: launch, wait, register the files, return the summary."""
    check_layout(ctx.cfg)
    if ctx.cfg.train.machine_rank != 0:
        raise ConfigError(f"train.machine_rank {ctx.cfg.train.machine_rank}: only machine 0 runs the train stage; "
                          f"join from this machine with: python -m {MODULE} join --config '<config request>'")
    result = ctx.writer.shard_manifest_path(RESULT_SHARD)
    if ctx.store.exists(result):  # from an earlier launch: it must not stand for this one
        ctx.store.remove_tree(result)
    request = write_request(ctx.cfg, ctx.key, ctx.scratch() / "launch", ctx.hooks, ctx.writer.folder)
    run_command(launch_command(ctx.cfg, request), ctx.progress)
    if not ctx.writer.shard_done(RESULT_SHARD):
        raise IntegrityError(f"{ctx.writer.url}: training finished without a complete {RESULT_SHARD} shard; "
                             "rerun the train stage (it resumes from the latest checkpoint)")
    return ctx.writer.shard_meta(RESULT_SHARD)["meta"]["summary"]


def run_command(cmd: list[str], progress: Callable[[int, int, str], None] | None = None) -> None:
    """Run the launcher; forward progress lines, pass the others through; raise with the output's tail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, env=env) as proc:
        for line in proc.stdout:
            if line.startswith(PROGRESS + " "):
                _, done, total, message = (line.rstrip("\n").split(" ", 3) + [""])[:4]
                if progress is not None:
                    progress(int(done), int(total), message)
                continue
            if line.startswith(LOG + " "):
                record = json.loads(line[len(LOG) + 1:])
                logging.getLogger(record["name"]).log(record["level"], "%s", record["msg"])
                tail.append(record["msg"] + "\n")
                continue
            tail.append(line)
            sys.stdout.write(line)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with status {proc.returncode}; the train stage resumes from "
                           "its latest checkpoint when rerun. Last lines:\n" + "".join(tail))


def join(config_request: dict) -> None:
    """Machine ``train.machine_rank`` >= 1 of a multi-machine training: run its processes, commit nothing."""
    from comat_core.stages.registry import compute_key
    from comat_core.config import build_config
    from comat_core.store.storage import ArtifactStore

    cfg = build_config(config_request)
    check_layout(cfg)
    if cfg.train.machine_rank == 0:
        raise ConfigError("machine 0 runs the train stage itself (comat run --stages train, or the comat-train "
                          "deployment); join is for train.machine_rank >= 1")
    key = compute_key(cfg, ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout), STAGE)
    with tempfile.TemporaryDirectory(prefix=f"comat-train-join-{os.getpid()}-") as tmp:  # pid: see scratch_prefix
        run_command(launch_command(cfg, write_request(cfg, key, Path(tmp))))


# ----------------------------------------------------------------------------------------------
# The process side: one of the launched processes


def train_from_request(request: dict) -> dict:
    """Train as one process of the launched group; the main process commits the result shard."""
    from comat_core.stages.registry import StageContext, compute_key, stage_inputs, with_world_models
    from comat_core.config import build_config
    from comat_core.store.storage import ArtifactStore
    from comat_core.stages.train.inputs import train_in_process

    cfg = build_config(request["config"])
    store = ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout)
    key = compute_key(cfg, store, STAGE)
    if key != request["key"]:
        raise ConfigError(f"this process computes train key {key}, the launching stage {request['key']}: "
                          "the machines must see the same config, inputs and storage")
    _build_tiny_models(cfg)
    rank = int(os.environ.get("RANK", "0"))  # set by the launcher; the trainer's Accelerator joins the group
    main = rank == 0
    _quiet_library_bars()
    if main:
        _forward_logs()
    scratch = Path(request["scratch"]) / f"rank-{rank}"
    scratch.mkdir(parents=True, exist_ok=True)
    inputs = {n: store.reader(n, compute_key(cfg, store, n)) for n in stage_inputs(cfg, STAGE)}
    writer = store.writer(STAGE, key)
    writer.folder = request.get("output") or key
    ctx = StageContext(with_world_models(cfg, inputs), store, STAGE, key, writer, inputs,
                       progress=_print_progress if main else _no_progress, hooks=dict(request.get("hooks") or {}),
                       workdir=scratch)
    summary = train_in_process(ctx)
    if main:
        ctx.writer.commit_shard(RESULT_SHARD, sorted(ctx.writer.files), {"summary": summary})
    return summary  # the launcher returns once every process has exited


def _build_tiny_models(cfg: ComatConfig) -> None:
    """Build the config's ``tiny://`` models into the cache before the process group exists: inside it,
    transformers' ``save_pretrained`` writes weights on rank 0 only, so a build by another rank would
    leave a model folder without weights."""
    from comat_core.models.loader import resolve_model
    from comat_core.stages.registry import STAGES

    for field in STAGES[STAGE].models:
        name = getattr(cfg.models, field)
        if isinstance(name, str) and name.startswith("tiny://"):
            resolve_model(name, f"models.{field}")


def _quiet_library_bars() -> None:
    """No diffusers/transformers progress bars in a launched process (one per process and model otherwise)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class _LogLines(logging.Handler):
    """A ``comat`` record as one ``comat-log <json>`` line on stdout, for the launching stage to log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"{LOG} " + json.dumps({"level": record.levelno, "name": record.name, "msg": record.getMessage()}),
                  flush=True)
        except Exception:  # noqa: BLE001 - a log line must never stop training
            self.handleError(record)


def _forward_logs() -> None:
    """The main process's ``comat`` records at INFO and above go to the launching stage's log."""
    logger = logging.getLogger("comat")
    logger.setLevel(logging.INFO)
    logger.addHandler(_LogLines(logging.INFO))


def _print_progress(done: int, total: int, message: str = "") -> None:
    print(f"{PROGRESS} {done} {total} {' '.join(message.split())}", flush=True)


def _no_progress(done: int, total: int, message: str = "") -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--request", type=Path, help="(set by the train stage) the launch request JSON")
    j = sub.add_parser("join", help="join a multi-machine training from machine train.machine_rank >= 1")
    j.add_argument("--config", required=True, help="config request JSON: {preset, config_file, overrides, storage}")
    args = parser.parse_args(argv)
    if args.command == "join":
        join(json.loads(args.config))
        return 0
    if args.request is None:
        parser.error("--request or join is required")
    train_from_request(json.loads(args.request.read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
