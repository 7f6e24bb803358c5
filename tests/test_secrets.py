"""A credential never reaches Prefect's database, the store or the logs.

Against a Prefect server of its own (so its SQLite file is known) and moto's S3: a unique string is
planted as a credential in ``storage.options`` (refused before any run is created, without quoting
it) and as ``AWS_SECRET_ACCESS_KEY`` (the way credentials are meant to come; a real run on S3 then
completes). Afterwards neither string is in any file of the server's home (database, WAL, log),
in any object of the store, in comat's debug log or on the console.
"""

from __future__ import annotations

import os
import time
import json
import uuid
from pathlib import Path

import pytest

from comat_core.store.credentials import RedactSecrets, check_storage_options, redact, secret_options
from fast_run import FAST
from flows.cli import main
from tasks.logs import debug_log_path


@pytest.fixture()
def server_and_s3():
    """A Prefect server started here (its home, with the database, is ours to read) and an S3 endpoint."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from services import BUCKET, TEST_CREDENTIALS, _flush_prefect_logs, start_moto, start_prefect_server

    prefect = start_prefect_server()
    moto = None
    endpoint, bucket = os.environ.get("COMAT_TEST_S3_ENDPOINT"), os.environ.get("COMAT_TEST_S3_BUCKET", BUCKET)
    if not endpoint:
        moto = start_moto()
        endpoint, bucket = moto.url, moto.extra["bucket"]
    env = {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "PREFECT_API_URL": prefect.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect.url}):
            yield prefect.workdir, f"s3://{bucket}/secrets-{uuid.uuid4().hex[:8]}"
            _flush_prefect_logs()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        prefect.stop()
        if moto is not None:
            moto.stop()


def test_credentials_in_storage_options_are_named_not_quoted():
    options = {"endpoint_url": "http://x", "key": "AKIA", "client_kwargs": {"aws_secret_access_key": "s3cr3t-value"},
               "token": "anon", "config_kwargs": {"retries": {"max_attempts": 1}}}
    assert secret_options(options) == ["storage.options.key", "storage.options.client_kwargs.aws_secret_access_key"]
    with pytest.raises(ValueError) as e:
        check_storage_options(options)
    assert "s3cr3t-value" not in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)
    assert check_storage_options({"endpoint_url": "http://x", "anon": True}) == {"endpoint_url": "http://x", "anon": True}


def test_working_directories_are_not_secrets(monkeypatch):
    """The shell's PWD/OLDPWD look like a 'pwd' but are paths: masking them hid every path in the logs."""
    monkeypatch.setenv("PWD", "/tmp/a-checkout-folder")
    monkeypatch.setenv("OLDPWD", "/tmp/another-folder")
    monkeypatch.setenv("DB_PWD", "db-password-planted-42")
    text = "computing /tmp/a-checkout-folder/comat-artifacts/tiny (from /tmp/another-folder), db-password-planted-42"
    assert redact(text) == "computing /tmp/a-checkout-folder/comat-artifacts/tiny (from /tmp/another-folder), ***"


def test_log_records_and_texts_mask_environment_credentials(monkeypatch):
    import logging

    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-planted-0123")
    assert redact("GET ...&X-Amz-Security-Token=session-token-planted-0123") == "GET ...&X-Amz-Security-Token=***"
    record = logging.LogRecord("comat", logging.ERROR, __file__, 1, "failed with %s", ("session-token-planted-0123",),
                               None)
    RedactSecrets().filter(record)
    assert record.getMessage() == "failed with ***"


def test_a_planted_secret_is_nowhere_after_a_run(server_and_s3, tmp_path, capsys, monkeypatch):
    home, root = server_and_s3
    in_options, in_environment = (f"planted-{what}-{uuid.uuid4().hex}" for what in ("options", "environment"))
    sets = [a for o in FAST + ["prompts.max_prompts=4"] for a in ("--set", o)]

    config = tmp_path / "with-secret.yaml"
    config.write_text(f"storage:\n  options:\n    client_kwargs:\n      aws_secret_access_key: {in_options}\n")
    rc = main(["run", "--storage", root, "--config", str(config), "--stages", "prompts", *sets])
    refused = capsys.readouterr()
    assert rc == 2 and "client_kwargs.aws_secret_access_key holds a credential" in refused.err
    assert [line for line in refused.err.splitlines() if line.startswith("comat: error:")] == [
        refused.err.strip().splitlines()[-1]]

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", in_environment)  # moto accepts any secret
    # a process of its own: Prefect's event and log workers of this test process may already serve
    # another server of the suite, so in-process events could miss this test's server
    import subprocess
    import sys

    code = "import sys, json; from flows.cli import main; sys.exit(main(json.loads(sys.argv[1])))"
    ran = subprocess.run([sys.executable, "-c", code, json.dumps(["run", "--storage", root, "--stages", "prompts",
                                                                  *sets])],
                         env=dict(os.environ), capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert ran.returncode == 0, ran.stderr[-3000:]
    ran.out, ran.err = ran.stdout, ran.stderr

    from comat_core.store.storage import ArtifactStore

    store = ArtifactStore(root)
    objects = {p: store.fs.cat_file(p) for p in store.fs.find(store.root)}
    assert any(p.endswith("prompts.parquet") for p in objects)  # the run really wrote to the store
    deadline = time.time() + 60
    while True:  # the server stores events a moment after it receives them
        server_files = {p: p.read_bytes() for p in Path(home).rglob("*") if p.is_file()}
        database = b"".join(data for p, data in server_files.items() if ".db" in p.name)
        if b"comat.stage.completed" in database or time.time() > deadline:
            break
        time.sleep(1)
    assert b"comat.stage.completed" in database and b"prompts" in database  # the run really reached the server
    # every run's debug log (one file per run: the refused one and the one that ran)
    debug_log = b"".join(p.read_bytes() for p in Path(debug_log_path()).parent.glob("run-*.log"))
    assert debug_log  # the runs did write their logs
    for secret in (in_options, in_environment):
        needle = secret.encode()
        assert needle not in refused.out.encode() + refused.err.encode() + ran.out.encode() + ran.err.encode()
        assert not [p for p, data in server_files.items() if needle in data], secret
        assert not [p for p, data in objects.items() if needle in data], secret
        assert needle not in debug_log


def test_a_run_submitted_with_a_credential_is_refused_and_the_credential_masked_in_prefect(server_and_s3):
    """A flow run created with a credential in its ``config`` parameter (``values.storage.options``, or an
    override) has it in Prefect's database from its creation on: the flow masks it in the stored parameters,
    then refuses the run in one line. Afterwards neither the API nor any file of the server's home holds it."""
    import subprocess
    import sys

    from prefect import get_client

    home, root = server_and_s3
    in_values, in_override = (f"planted-{what}-{uuid.uuid4().hex}" for what in ("values", "override"))
    config = {"storage": root, "overrides": [f"storage.options.token={in_override}"],
              "values": {"storage": {"root": root, "options": {"client_kwargs": {"aws_secret_access_key": in_values}}}}}
    code = ("import json, sys; from flows.pipeline import comat; "
            "s = comat(config=json.loads(sys.argv[1]), stages=['prompts'], return_state=True); "
            "print('STATE', s.type.value, s.state_details.flow_run_id); print('MESSAGE', s.message)")
    ran = subprocess.run([sys.executable, "-c", code, json.dumps(config)], env=dict(os.environ), capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    state = next(line.split() for line in ran.stdout.splitlines() if line.startswith("STATE"))
    assert state[1] == "FAILED", ran.stdout + ran.stderr[-3000:]
    assert ("storage.options.client_kwargs.aws_secret_access_key, storage.options.token holds a credential, which "
            "was masked in this run's stored parameters") in ran.stdout
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state[2])
    assert run.parameters["config"]["values"]["storage"]["options"] == {"client_kwargs": {"aws_secret_access_key": "***"}}
    assert run.parameters["config"]["overrides"] == ["storage.options.token=***"]
    deadline = time.time() + 60
    while True:  # the run's events reach the database a moment after the run ends
        server_files = {p: p.read_bytes() for p in Path(home).rglob("*") if p.is_file()}
        database = b"".join(data for p, data in server_files.items() if ".db" in p.name)
        if b"prefect.flow-run.Failed" in database or time.time() > deadline:
            break
        time.sleep(1)
    assert b"prefect.flow-run.Failed" in database
    rows = database_rows(Path(home) / "prefect.db")
    assert any(str(run.id) in row for row in rows)  # the run's rows are there
    for secret in (in_values, in_override):
        assert secret not in ran.stdout + ran.stderr
        assert not [row for row in rows if secret in row], secret  # no row of any table, events included
        # only SQLite's write-ahead log may keep the overwritten page's old bytes, until they are reused
        assert not [p for p, data in server_files.items() if secret.encode() in data and not p.name.endswith("-wal")]


def database_rows(path: Path) -> list[str]:
    """Every row of every table of a SQLite database, as text (read while the server runs)."""
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [repr(row) for t in tables for row in con.execute(f'SELECT * FROM "{t}"')]
    finally:
        con.close()
