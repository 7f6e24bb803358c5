"""Apply ``deployments/automations.yaml`` to the Prefect server (``comat deploy`` does, after the deployments).

Placeholders: ``<deployment:FLOW/NAME>`` becomes that deployment's id (it must be deployed), and
``<notify-block>`` the id of the notification block given as ``BLOCK_TYPE/BLOCK_NAME`` (e.g.
``slack-webhook/comat-alerts``, created in the UI or with ``prefect block create``); without one,
the automations that notify are skipped, with a line saying how to add them. Applying replaces
automations of the same name, so it can run after every deploy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from comat_core.errors import ConfigError

AUTOMATIONS_FILE = Path(__file__).resolve().parent.parent / "deployments" / "automations.yaml"
_DEPLOYMENT = re.compile(r"^<deployment:(.+)>$")
NOTIFY = "<notify-block>"


def load_automations(path: Path = AUTOMATIONS_FILE) -> list[dict]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["automations"]


def _fill(value: Any, resolve) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, resolve) for v in value]
    return resolve(value) if isinstance(value, str) and value.startswith("<") and value.endswith(">") else value


def apply_automations(notify_block: str | None = None, path: Path = AUTOMATIONS_FILE) -> list[str]:
    """Create (or replace) the automations; returns the names applied."""
    from prefect import get_client
    from prefect.automations import Automation
    from prefect.exceptions import ObjectNotFound

    applied = []
    with get_client(sync_client=True) as client:
        def resolve(placeholder: str) -> str:
            if placeholder == NOTIFY:
                if not notify_block or "/" not in notify_block:
                    raise LookupError(placeholder)
                block_type, name = notify_block.split("/", 1)
                try:
                    return str(client.read_block_document_by_name(name, block_type).id)
                except ObjectNotFound:
                    raise ConfigError(f"notification block {notify_block!r} does not exist; create it in the UI "
                                      "(Blocks) or with prefect block create, then pass BLOCK_TYPE/BLOCK_NAME") from None
            match = _DEPLOYMENT.match(placeholder)
            if not match:
                raise ConfigError(f"{path.name}: unknown placeholder {placeholder}")
            try:
                return str(client.read_deployment_by_name(match.group(1)).id)
            except ObjectNotFound:
                raise ConfigError(f"{path.name}: deployment {match.group(1)} is not deployed; run comat deploy first") from None

        for spec in load_automations(path):
            try:
                spec = _fill(spec, resolve)
            except LookupError:
                print(f"automation {spec['name']!r} skipped: it notifies; pass --notify BLOCK_TYPE/BLOCK_NAME "
                      "(e.g. slack-webhook/comat-alerts) to create it")
                continue
            try:
                Automation.read(name=spec["name"]).delete()
            except ValueError:  # not there yet
                pass
            Automation.model_validate(spec).create()
            applied.append(spec["name"])
            print(f"automation {spec['name']!r} applied")
    return applied
