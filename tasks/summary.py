"""What a pipeline run did, in one place: the parent run's summary artifact and ``comat run``'s last lines.

``stage_rows`` reads each stage's manifest back from the store (so it means the same for inline
stages and for stages run as deployments on other workers): computed in this run or cached, key,
seconds, folder. ``closing_lines`` says where the evaluation report, the grid and the LoRA are and
how to load the LoRA in diffusers. ``summary_markdown`` puts both together with the headline
evaluation result (base vs tuned per category, with the 95 % interval of the paired difference).
"""

from __future__ import annotations

import time

from comat_core.config import ComatConfig
from comat_core.store.storage import ArtifactStore


def stage_rows(cfg: ComatConfig, store: ArtifactStore, results: dict[str, str], started: float,
               failed: tuple[str, BaseException] | None = None) -> list[dict]:
    """One row per stage run: stage, state (computed, with what it resumed from / cached / failed /
    cancelled / interrupted), key, seconds, url (for the stage that stopped: why)."""
    rows = []
    for stage, url in results.items():
        key = url.rstrip("/").rsplit("/", 1)[-1]
        manifest = store.read_manifest(stage, key) or {}
        computed = float(manifest.get("finished_at", 0)) >= started
        state = "computed" + resumed_note(manifest.get("summary") or {}) if computed else "cached"
        rows.append({"stage": stage, "state": state, "key": key,
                     "seconds": round(float(manifest.get("seconds", 0.0)), 1) if computed else 0.0, "url": url})
    if failed:
        stage, error = failed
        how = ending(error)
        try:
            from comat_core.stages.registry import compute_key

            key = compute_key(cfg, store, stage)
        except Exception:  # noqa: BLE001 - an input is missing: the stage has no key yet
            key = ""
        what = (f"{how}; its completed shards and checkpoints are kept, a rerun resumes" if how != "failed"
                else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
        rows.append({"stage": stage, "state": how, "key": key, "seconds": 0.0, "url": what[:300]})
    return rows


def evaluation_summary(store: ArtifactStore, results: dict[str, str]) -> dict | None:
    """The evaluate stage's ``summary.json`` of this run, None without evaluate."""
    url = results.get("evaluate")
    if not url:
        return None
    manifest = store.read_manifest("evaluate", url.rstrip("/").rsplit("/", 1)[-1])
    if manifest is None or "summary.json" not in manifest.get("files", {}):
        return None
    from comat_core.store.storage import StageReader

    return StageReader(store, "evaluate", manifest["key"], manifest).read_json("summary.json")


def resumed_note(summary: dict) -> str:
    """`` (resumed from step N)`` for a training that went on from a checkpoint, `` (resumed: k of n
    shards were done)`` for a sharded stage that found committed shards; empty otherwise."""
    if summary.get("resumed_from"):
        return f" (resumed from step {summary['resumed_from']})"
    if summary.get("shards_reused"):
        return f" (resumed: {summary['shards_reused']} of {summary.get('shards', '?')} shards were done)"
    return ""


def ending(error: BaseException) -> str:
    """How a stage stopped: ``cancelled`` (someone cancelled the run), ``interrupted`` (a signal or
    Ctrl-C), or ``failed``."""
    import asyncio

    if isinstance(error, asyncio.CancelledError) or _cancel_requested():
        return "cancelled"
    if isinstance(error, (KeyboardInterrupt, SystemExit)) or type(error).__name__ == "TerminationSignal":
        return "interrupted"
    return "failed"


def _cancel_requested() -> bool:
    """The current flow run is being cancelled (the server moved it to Cancelling before stopping it)."""
    try:
        from prefect import get_client
        from prefect.runtime import flow_run

        if not flow_run.id:
            return False
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
        return bool(state and (state.is_cancelling() or state.is_cancelled()))
    except Exception:  # noqa: BLE001 - no server, no run: not a cancel
        return False


def headline_rows(store: ArtifactStore, results: dict[str, str]) -> list[dict]:
    """The evaluation's headline metric per category (base, tuned, delta, 95 % CI), [] without evaluate."""
    return headline_of(evaluation_summary(store, results))


def headline_of(summary: dict | None) -> list[dict]:
    """The headline rows of an evaluate ``summary.json`` (None: no evaluation, no rows)."""
    from tasks.rows import result_rows

    return [r for r in result_rows(summary.get("results", {})) if r["headline"]] if summary else []


def headline_lines(store: ArtifactStore, results: dict[str, str]) -> list[str]:
    """The headline evaluation as console lines, under the warning when the numbers carry no meaning."""
    from comat_core.stages.evaluate.report import caveat

    summary = evaluation_summary(store, results)
    rows = headline_of(summary)
    if not rows:
        return []
    lines = ["evaluation (headline metric per category; delta = tuned - base, 95 % CI over prompts):"]
    warning = caveat(summary)
    if warning:
        lines.append(f"  {warning}")
    lines.append(f"  {'category':<15} {'metric':<16} {'base':>8} {'tuned':>8} {'delta':>8}  {'95 % CI':<20} pairs")
    for h in rows:
        ci = f"[{_fmt(h['ci95_low'])}, {_fmt(h['ci95_high'])}]"
        lines.append(f"  {h['category']:<15} {h['metric']:<16} {_fmt(h['base']):>8} {_fmt(h['tuned']):>8} "
                     f"{_fmt(h['delta']):>8}  {ci:<20} {_fmt(h['pairs'])}")
    return lines


def closing_lines(cfg: ComatConfig, store: ArtifactStore, results: dict[str, str]) -> list[str]:
    """Where the report, the grid and the LoRA are, and the lines that load the LoRA in diffusers."""
    lines = []
    if "evaluate" in results:
        lines += [f"report: {store_path(store, results['evaluate'], 'report.md')}",
                  f"grid:   {store_path(store, results['evaluate'], 'grid.png')}",
                  f"chart:  {store_path(store, results['evaluate'], 'chart.png')}"]
    if "train" not in results:
        return lines
    lora = store_path(store, results["train"], "lora")
    lines.append(f"LoRA:   {lora}")
    if not store.is_local:
        lines.append(f"        copy it first: python -c \"import fsspec; fsspec.filesystem('{lora.split('://')[0]}')"
                     f".get('{lora}', 'lora', recursive=True)\" (then use 'lora' below)")
    from comat_core.export import EXAMPLE_PROMPT, diffusers_lines
    from comat_core.models.loader import is_tiny, is_world, resolve_model

    model = cfg.models.pretrained
    example = EXAMPLE_PROMPT
    if is_tiny(model):  # built by comat into its cache: a local diffusers folder on this machine
        model = resolve_model(model, "models.pretrained")
    elif is_world(model) and "world" in results:  # the world stage's trained model
        model = store_path(store, results["world"], model[len("world://"):])
        example = "a red circle and a blue square"
    unet = store_path(store, results["sdxl_prefinetune"], "unet") if "sdxl_prefinetune" in results else None
    if unet and not store.is_local:
        lines.append(f"        and: python -c \"import fsspec; fsspec.filesystem('{unet.split('://')[0]}')"
                     f".get('{unet}', 'unet', recursive=True)\"")
        unet = "unet"
    lines.append("load it in diffusers:")
    lines += ["    " + line for line in diffusers_lines(cfg, model, lora if store.is_local else "lora", unet, example)]
    return lines


def rows_url(rows: list[dict], stage: str) -> str | None:
    return next((r["url"] for r in rows if r["stage"] == stage and r["state"] != "failed"), None)


def store_path(store: ArtifactStore, stage_url: str, rel: str) -> str:
    return f"{stage_url.rstrip('/')}/{rel}"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_markdown(cfg: ComatConfig, store: ArtifactStore, rows: list[dict], headline: list[dict],
                     closing: list[str], started: float) -> str:
    from tasks.artifacts import evaluation_pictures, folder_markdown

    total = time.time() - started
    counts = {s: sum(r["state"].split(" ")[0] == s for r in rows)
              for s in ("computed", "cached", "failed", "cancelled", "interrupted")}
    out = [f"## comat run: preset `{cfg.preset}`, storage `{store.root_url}`",
           f"{counts['computed']} computed, {counts['cached']} cached"
           + "".join(f", **{counts[s]} {s}**" for s in ("failed", "cancelled", "interrupted") if counts[s])
           + f" in {total:.0f} s\n",
           "| stage | state | key | seconds | folder |", "|---|---|---|---|---|"]
    for r in rows:
        folder = r["url"] if r["state"] in ("failed", "cancelled", "interrupted") else folder_markdown(store, r["url"])
        out.append(f"| {r['stage']} | {r['state']} | `{r['key']}` | {r['seconds']:g} | {folder} |")
    if headline:
        from comat_core.stages.evaluate.report import caveat, taxonomy_lines

        evaluation = evaluation_summary(store, {"evaluate": rows_url(rows, "evaluate")}) or {}
        warning = caveat(evaluation)
        out += ["", "### Evaluation (headline metric per category; delta = tuned - base, 95 % CI over prompts)", "",
                *([f"> **{warning}**", ""] if warning else []),
                "| category | metric | base | tuned | delta | 95 % CI | pairs |", "|---|---|---|---|---|---|---|"]
        for h in headline:
            ci = f"[{_fmt(h['ci95_low'])}, {_fmt(h['ci95_high'])}]"
            out.append(f"| {h['category']} | {h['metric']} | {_fmt(h['base'])} | {_fmt(h['tuned'])} | "
                       f"{_fmt(h['delta'])} | {ci} | {_fmt(h['pairs'])} |")
        out += [line.replace("## ", "### ", 1) for line in taxonomy_lines(evaluation.get("results", {}))]
        out += ["", *evaluation_pictures(store, {r["stage"]: r["url"] for r in rows if r["state"] != "failed"})]
    if closing:
        out += ["", "### Outputs", "", "```", *closing, "```"]
    return "\n".join(out)
