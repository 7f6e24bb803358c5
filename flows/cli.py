"""The ``comat`` command.

    comat run      run the pipeline (the parent Prefect flow, in-process, no server needed)
    comat status   show each stage's key and state in a store
    comat config   print the resolved configuration
    comat export   copy the trained LoRA (and a model card) out of the store into a folder
    comat deploy   register the deployments of deployments/prefect.yaml with a Prefect server

Everything is validated before any work starts: a bad preset, key, value, prompt file, storage URL
or model path ends with a one-line message and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tasks.logs import drop_logging, setup_logging

EXIT_USAGE = 2

EPILOG = """examples:
  comat run                                   # whole pipeline, tiny preset, ./comat-artifacts/tiny
  comat run --preset sd15 --storage s3://bucket/comat --prompts 'data/prompts/*.txt'
  comat run --stages prompts,gan_gt           # only these stages (their inputs must exist)
  comat run --force train                     # recompute train (and, through new keys, evaluate)
  CUDA_VISIBLE_DEVICES=3 comat run --stages gan_gt --part 3/8   # one of 8 GPUs; then once without --part
  comat run --set train.learning_rate=1e-4 --set train.max_steps=500
  comat status --storage ./comat-artifacts/tiny
  comat config --preset sdxl                  # print the resolved configuration as YAML
  comat run --preset shapes                   # the shapes world: base vs CoMat, scored by an exact judge
  comat export --storage ./comat-artifacts/tiny --to ./comat-lora   # LoRA + model card, for the Hub
"""


def _common(p: argparse.ArgumentParser) -> None:
    from comat_core.config import PRESETS

    p.add_argument("--preset", choices=list(PRESETS),
                   help="base configuration (default: tiny, or the preset named in --config); shapes: the shapes "
                        "world, where the method's effect is measured on a CPU")
    p.add_argument("--config", metavar="FILE", help="YAML file with config sections, merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--storage", metavar="URL", help="artifact store root: a local folder, s3://bucket/prefix, gs://…")
    p.add_argument("--prompts", action="append", default=None, metavar="URL_OR_GLOB",
                   help="prompt files replacing the preset's sources (repeatable; one prompt per line, UTF-8)")
    _verbose(p)


def _verbose(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v`` before or after the command (``comat -v run`` and ``comat run -v``); the command's own
    flag leaves the top-level one alone when it is not given."""
    p.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="debug logging, tracebacks on the console")


def build_parser() -> argparse.ArgumentParser:
    from comat_core import __version__
    from comat_core.config import STAGE_NAMES

    parser = argparse.ArgumentParser(
        prog="comat", description="CoMat fine-tuning of Stable Diffusion as a cached, resumable pipeline.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose(parser, top=True)
    parser.add_argument("--version", action="version", version=f"comat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline (in-process Prefect flow)", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--stages", metavar="A,B",
                     help="run only these stages (comma separated), in pipeline order; stages: "
                          f"{', '.join(STAGE_NAMES)} (world: shapes preset only; sdxl_prefinetune: SDXL only)")
    run.add_argument("--force", metavar="A,B", help="recompute these stages even when complete; dependants follow")
    run.add_argument("--part", metavar="K/N",
                     help="with one sharded --stages stage: compute only part K of N (K from 0) of its shards, "
                          "without Prefect and without committing the stage (one process per GPU side by side; "
                          "then run the stage once without --part to verify the shards and commit it)")

    st = sub.add_parser("status", help="show each stage's key and state (complete / partial / missing)")
    _common(st)
    st.add_argument("--verify", action="store_true",
                    help="read every file of every complete stage and check it against its manifest (sha256); "
                         "exit 1 naming the files that fail")

    cf = sub.add_parser("config", help="print the resolved configuration as YAML")
    _common(cf)

    ex = sub.add_parser("export", help="copy the trained LoRA, the evaluation report and a model card into a folder")
    _common(ex)
    ex.add_argument("--to", required=True, metavar="DIR", help="a new (or empty) local folder")

    dp = sub.add_parser("deploy", help="register deployments/prefect.yaml with the Prefect server in PREFECT_API_URL")
    dp.add_argument("--name", action="append", default=None, help="only this deployment (repeatable)")
    _verbose(dp)
    dp.add_argument("--local", action="store_true",
                    help="local profile: every deployment on one `process` pool named `local` running this checkout")
    dp.add_argument("--notify", metavar="BLOCK_TYPE/NAME", default=None,
                    help="notification block for the automation that reports failed or crashed runs, "
                         "e.g. slack-webhook/comat-alerts (without it that automation is skipped)")
    dp.add_argument("--gpus", type=int, default=None, metavar="N",
                    help="GPU stages that may run at once (default with --local: the GPUs this machine has, at least 1)")
    return parser


def _split(text: str | None) -> list[str] | None:
    """``a, b`` -> ``["a", "b"]``; a flag not given -> None; a given but blank one (``' , '``) -> ``[]``."""
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def config_request(args) -> dict:
    """The ``config`` parameter of the parent flow: a JSON-able description of the config to build."""
    return {
        "preset": args.preset,
        "config_file": args.config,
        "overrides": list(args.overrides or []),
        "storage": args.storage,
        "prompts": args.prompts,
    }


EXIT_FAILURE = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug_log = setup_logging(args.verbose, args.command)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the embedded server can take longer than Prefect's default to start on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not args.verbose:  # keep the stages' own progress bars; hide the libraries' per-model chatter
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from comat_core.errors import ComatError

    details = f" (details: {debug_log})" if debug_log else ""
    try:
        return _dispatch(args)
    except ComatError as e:
        from comat_core.errors import IntegrityError, StorageError

        _log_traceback(debug_log)
        resume = "; completed stages, shards and checkpoints are kept: rerun to resume" if (
            isinstance(e, StorageError) and not isinstance(e, IntegrityError) and args.command == "run") else ""
        print(f"comat: error: {_first_line(e)}{resume}", file=sys.stderr)
        for line in _commands(e):  # e.g. the hf download command of each missing model
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("comat: interrupted; completed shards and checkpoints are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a storage client's error after the retries, or a bug
        from tasks.stage import is_transient

        _log_traceback(debug_log)
        if is_transient(e):
            print(f"comat: error: storage failed after retries: {type(e).__name__}: {_first_line(e)}; completed "
                  f"shards and checkpoints are kept, rerun when the store is back{details}", file=sys.stderr)
        else:
            print(f"comat: error: internal error {type(e).__name__}: {_first_line(e)}{details}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        drop_logging()


def _first_line(e: BaseException) -> str:
    from comat_core.store.credentials import redact

    lines = redact(str(e)).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _commands(e: BaseException) -> list[str]:
    """The lines after an error's first one that are commands to copy (``hf download …``); other
    continuation lines stay in the debug log."""
    return [line for line in str(e).strip().splitlines()[1:] if line.startswith("hf download ")]


def _log_traceback(path: str | None) -> None:
    if path:
        import traceback

        from comat_core.store.credentials import redact

        with open(path, "a", encoding="utf-8") as f:
            f.write(redact(traceback.format_exc()))


def _dispatch(args) -> int:
    from comat_core.config import build_config
    from comat_core.preflight import check_this_machine, preflight

    if args.command == "deploy":
        from flows.deploy import deploy

        return deploy(names=args.name, local=args.local, gpus=args.gpus, notify=args.notify)
    cfg = build_config(config_request(args))
    if args.command == "config":
        from comat_core.config import config_to_yaml

        print(config_to_yaml(cfg), end="")
        return 0
    if args.command == "status":
        return _status(cfg, verify=args.verify)
    if args.command == "export":
        return _export(cfg, args.to)
    stages, force = _split(args.stages), _split(args.force)
    if stages == []:  # an empty variable must not widen the run to every stage
        from comat_core.errors import ConfigError

        raise ConfigError(f"--stages {args.stages!r} names no stage; give stages such as "
                          f"--stages {','.join(cfg.stage_order()[:2])}, or leave --stages out to run them all")
    if args.part:
        check_part(cfg, stages, force, args.part)  # a bad --part is named before anything else
    preflight(cfg, stages=stages, force=force)
    check_this_machine(cfg, stages=stages, force=force)  # the stages run here, in this process
    from flows.cached import cached_results

    results = None if args.part else cached_results(cfg, stages, force)  # all cache hits, no server: no Prefect
    if results is not None:
        return _print_results(cfg, results)
    # the heavy imports (torch, diffusers, Prefect) only now that the request is known to be valid
    if not args.verbose:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    if args.part:
        return _run_part(cfg, stages, force, args.part)
    from flows.pipeline import comat

    started = time.time()
    results = comat(config=config_request(args), stages=stages, force=force)
    return _print_results(cfg, results, started)


def _print_results(cfg, results: dict[str, str], started: float | None = None) -> int:
    """The closing lines of ``comat run``: the stage table (computed or cached), the headline evaluation,
    where the outputs are and how to load them. ``started`` None: nothing was computed (the cached path)."""
    if started is None:
        started = time.time()
    from comat_core.store.storage import ArtifactStore
    from tasks.summary import closing_lines, headline_lines, stage_rows

    store = ArtifactStore(cfg.storage.root, cfg.storage.options)
    rows = stage_rows(cfg, store, results, started)
    width = max((len(r["stage"]) for r in rows), default=0)
    for r in rows:
        print(f"{r['stage']:<{width}}  {r['state']:<8}  {r['url']}")
    for line in headline_lines(store, results) + closing_lines(cfg, store, results):
        print(line)
    return 0


def _status(cfg, verify: bool = False) -> int:
    from comat_core.stages.registry import status
    from comat_core.store.storage import ArtifactStore

    store = ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout)
    store.check_reachable(write=False)
    rows = status(cfg, store, verify=verify)
    print(f"storage: {store.root_url}   preset: {cfg.preset}")
    for r in rows:
        state = r.state + (f" ({r.shards} shards)" if r.state == "partial" else "")
        print(f"  {r.stage:<17} {r.key or '-':<17} {state:<22} {r.detail if r.state != 'waiting' else ''}")
    corrupt = [r.stage for r in rows if r.state == "corrupt"]
    if corrupt:
        print(f"comat: error: {', '.join(corrupt)}: files do not match their manifests (listed above); "
              f"recompute with comat run --force {','.join(corrupt)}", file=sys.stderr)
        return 1
    return 0


def check_part(cfg, stages: list[str] | None, force: list[str] | None, part: str):
    """``--part K/N`` goes with exactly one sharded stage and no --force; returns the parsed part."""
    from comat_core.errors import ConfigError
    from comat_core.stages.registry import STAGES
    from comat_core.store.shards import ShardPart

    if not stages or len(stages) != 1 or not STAGES[stages[0]].sharded or force:
        sharded = ", ".join(s for s in cfg.stage_order() if STAGES[s].sharded)
        raise ConfigError(f"--part needs exactly one sharded stage in --stages ({sharded}) and no --force")
    return ShardPart.parse(part)


def _run_part(cfg, stages: list[str] | None, force: list[str] | None, part: str) -> int:
    from comat_core.stages.registry import run_stage
    from comat_core.store.storage import ArtifactStore

    shard_part = check_part(cfg, stages, force, part)
    result = run_stage(cfg, ArtifactStore(cfg.storage.root, cfg.storage.options), stages[0], shard_part=shard_part)
    state = "already complete" if result.cached else f"part {part} done, stage not committed"
    print(f"{stages[0]}  {result.url}  ({state})")
    return 0


def _export(cfg, to: str) -> int:
    from comat_core.export import export
    from comat_core.store.storage import ArtifactStore

    store = ArtifactStore(cfg.storage.root, cfg.storage.options)
    store.check_reachable()
    out = export(cfg, store, to)
    print(f"exported {out['lora']} to {out['to']}")
    for what in ("unet", "evaluation"):
        if out[what]:
            print(f"  with {what}: {out[what]}")
    print(f"load it: pipe.load_lora_weights({out['to']!r}); publish it: hf upload <user>/<repo> {out['to']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
