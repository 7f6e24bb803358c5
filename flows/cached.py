"""``comat run`` with nothing to do: answer from the stage keys, without starting Prefect.

With no Prefect server configured, ``comat run`` records its flow run on a temporary server that
Prefect starts in this process and throws away at exit (about 9 s of the 18 s a fully cached tiny
run took, with 8 s more for importing Prefect, torch and diffusers). When every requested stage is
already complete in storage (its manifest is there at the key this config gives it), nothing would
be computed and nothing recorded anywhere that outlives the command, so ``cached_results`` answers
from the keys alone (``comat_core``: config, manifests, no Prefect, no torch) and the command prints
the same closing lines. With a configured server (``PREFECT_API_URL``, or a Prefect profile or
settings file that may set it) the run is recorded there as before, cache hits included.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from comat_core.config import ComatConfig

log = logging.getLogger("comat.flows")

# files from which Prefect may read PREFECT_API_URL besides the environment (then Prefect itself is asked)
SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")


def prefect_server_configured() -> bool:
    """A Prefect API URL is set: in the environment, or possibly in a profile or settings file (then
    Prefect's own settings decide; importing them costs about a second, so only then)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    candidates = [profiles, *(Path.cwd() / f for f in SETTINGS_FILES)]
    if not any(p.is_file() and "PREFECT_API_URL" in p.read_text(errors="replace").upper() for p in candidates):
        return False
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def cached_results(cfg: ComatConfig, stages: list[str] | None, force: list[str] | None) -> dict[str, str] | None:
    """``{stage: URL}`` when no server is configured and every requested stage is a cache hit; else None
    (the run goes through the Prefect flow)."""
    from comat_core.preflight import stages_to_compute
    from comat_core.stages.registry import compute_key
    from comat_core.store.storage import ArtifactStore

    if force or prefect_server_configured():
        return None
    if stages_to_compute(cfg, stages, force):
        return None
    store = ArtifactStore(cfg.storage.root, cfg.storage.options, cfg.storage.timeout)
    results = {}
    for stage in [s for s in cfg.stage_order() if not stages or s in stages]:
        results[stage] = store.stage_url(stage, compute_key(cfg, store, stage))
        log.info("%s: cache hit %s", stage, results[stage])
    log.info("all %d stages complete in storage: nothing to compute, no Prefect run recorded "
             "(set PREFECT_API_URL to record runs on a server)", len(results))
    return results
