"""Credentials come from the environment and go nowhere else: not into the config, Prefect, the store or logs.

The configuration travels: it is a flow-run parameter (stored in Prefect's database, shown in its
UI), part of every ``comat.stage.completed`` event (so an automation can rebuild it), and the
request deployments pass to each other. A credential in ``storage.options`` would be copied into all
of these. So ``check_storage_options`` refuses one (``key``, ``secret``, ``token``, ``password``, also
nested, e.g. ``client_kwargs.aws_secret_access_key``) with one line pointing at the environment:
s3fs reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` (or a profile,
or an instance role) itself, gcsfs ``GOOGLE_APPLICATION_CREDENTIALS``, adlfs ``AZURE_STORAGE_*``.

What remains is redaction as a second line of defence: ``redact`` replaces the value of every
secret-named environment variable (8 characters or more) in a text, ``RedactSecrets`` does it for
log records (message and traceback), ``redact_obj`` for an event's payload and resource. They never see a
credential in normal operation; they keep a library's error message or a signed URL that happens to
quote one from reaching a log file, the Prefect database or an artifact.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

_SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "private")
_SECRET_PARTS = {"key", "pwd", "sas", "auth", "signature", "passphrase"}
_MODES = {"anon", "google_default", "cloud", "cache", "browser"}  # gcsfs ``token`` values that hold no secret
_MIN_REDACTED = 8  # shorter values (``true``, ``testing``) would turn ordinary words into ***
MASK = "***"
_NOT_SECRETS = {"pwd", "oldpwd"}  # the shell's working directories: masking them hides every path in the logs


def is_secret_name(name: object) -> bool:
    """A key or variable name that holds a credential: ``secret``, ``password``, ``token`` in it, or a
    ``key``/``sas``/``auth`` part (``key``, ``account_key``, ``AWS_ACCESS_KEY_ID``). The shell's ``PWD`` and
    ``OLDPWD`` are working directories, not passwords."""
    text = str(name).lower()
    if text in _NOT_SECRETS:
        return False
    return any(w in text for w in _SECRET_WORDS) or bool(_SECRET_PARTS & set(re.split(r"[_\-.\s]+", text)))


def secret_options(options: Any, prefix: str = "storage.options") -> list[str]:
    """Dotted names of the credentials set in ``options`` (nested tables searched), e.g. ``storage.options.secret``."""
    found = []
    if isinstance(options, dict):
        for name, value in options.items():
            dotted = f"{prefix}.{name}"
            if isinstance(value, dict):
                found += secret_options(value, dotted)
            elif is_secret_name(name) and value not in (None, "", False) and not (
                    isinstance(value, str) and value in _MODES):
                found.append(dotted)
    return found


def check_storage_options(options: dict) -> dict:
    """``options`` unchanged, or ``ValueError`` naming (never quoting) the credentials in it."""
    found = secret_options(options)
    if found:
        raise ValueError(f"{', '.join(found)} holds a credential, which would be stored in Prefect's database, its "
                         "events and the runs it starts; remove it and set the standard variables instead "
                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE for S3, "
                         "GOOGLE_APPLICATION_CREDENTIALS for gs://)")
    return options


def _masked(options: Any) -> Any:
    """``options`` with the value of every credential (as ``secret_options`` finds them) replaced by ``***``."""
    if not isinstance(options, dict):
        return options
    out = {}
    for name, value in options.items():
        if isinstance(value, dict):
            out[name] = _masked(value)
        else:
            out[name] = MASK if secret_options({name: value}) else value
    return out


def redact_request(request: Any) -> tuple[Any, list[str]]:
    """A config request (the flows' ``config`` parameter) with every credential in its storage options masked,
    and the dotted names of those found: in ``values.storage.options`` and in overrides of
    ``storage.options...`` (``storage.options.secret=...`` or a whole table). Used to take a credential
    someone submitted back out of a flow run's stored parameters before the run is refused."""
    import copy

    if not isinstance(request, dict):
        return request, []
    out, found = copy.deepcopy(request), []
    storage = (out.get("values") or {}).get("storage") if isinstance(out.get("values"), dict) else None
    if isinstance(storage, dict) and isinstance(storage.get("options"), dict):
        found += secret_options(storage["options"])
        storage["options"] = _masked(storage["options"])
    overrides = out.get("overrides")
    if isinstance(overrides, list):
        for i, item in enumerate(overrides):
            names = _override_secrets(item)
            if names:
                found += names
                overrides[i] = f"{str(item).split('=', 1)[0]}={MASK}"
    return out, found


def _override_secrets(item: Any) -> list[str]:
    """The credentials one ``KEY=VALUE`` override sets in ``storage.options`` (YAML value, as the config reads it)."""
    import yaml

    key, eq, raw = str(item).partition("=")
    key = key.strip()
    if not eq or not (key == "storage.options" or key.startswith("storage.options.")):
        return []
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.split(".")[2:]):
        value = {part: value}
    return secret_options(value) if isinstance(value, dict) else []


def environment_secrets() -> list[str]:
    """The values of the secret-named environment variables, longest first (8 characters or more).

    An access key's id (``AWS_ACCESS_KEY_ID``) names a key without granting anything and is part of
    every signed URL; only the secret that goes with it, and session tokens, are masked."""
    values = {v for k, v in os.environ.items()
              if is_secret_name(k) and not k.lower().endswith("key_id") and len(v) >= _MIN_REDACTED}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every environment credential (``secrets``: ``environment_secrets()``, read now if not
    given) replaced by ``***``."""
    for value in environment_secrets() if secrets is None else secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_obj(obj: Any) -> Any:
    """A JSON-able value with environment credentials masked in its strings (keys are left alone: a config
    has ``token_weight`` and the like, which are no secrets)."""
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return redact(obj) if isinstance(obj, str) else obj


class RedactSecrets(logging.Filter):
    """A handler filter: the record's message and traceback with environment credentials masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = environment_secrets()
        if not secrets:
            return True
        message = record.getMessage()
        clean = redact(message, secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        return True


def add_redaction(handler: logging.Handler) -> logging.Handler:
    """Give ``handler`` the ``RedactSecrets`` filter (once)."""
    if not any(isinstance(f, RedactSecrets) for f in handler.filters):
        handler.addFilter(RedactSecrets())
    return handler
