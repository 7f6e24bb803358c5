"""The ``comat`` command: help, config printing, status, and bad input → one line, exit 2, nothing written."""

import glob

import pytest

from flows.cli import main


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def no_manifest(root):
    return not glob.glob(f"{root}/**/_manifest.json", recursive=True)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("run", "status", "config", "deploy", "--preset", "examples:"):
        assert word in out


def test_version_verbose_after_the_command_and_stage_names_in_help(capsys):
    from comat_core import __version__
    from comat_core.config import STAGE_NAMES
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"comat {__version__}"
    parser = build_parser()
    assert parser.parse_args(["run", "-v"]).verbose and parser.parse_args(["-v", "run"]).verbose
    assert parser.parse_args(["status", "--verbose"]).verbose and not parser.parse_args(["run"]).verbose
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "stages: " + ", ".join(STAGE_NAMES) in help_text


def test_console_drops_prefects_server_advice_and_the_flows_stage_rows():
    import logging

    from tasks.logs import STAGE_ROW_FORMAT, _not_on_console

    def record(name, msg, *args):
        return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)

    assert not _not_on_console(record("prefect", "Starting temporary server on http://127.0.0.1:8475\nSee …"))
    assert not _not_on_console(record("comat.flows", STAGE_ROW_FORMAT, "train", "cached", "k", "url"))
    assert _not_on_console(record("comat.flows", "run summary published"))
    assert _not_on_console(record("prefect.flow_runs", "Finished in state Completed()"))


def test_config_prints_resolved_yaml(capsys):
    rc, out, _ = run_cli(capsys, "config", "--preset", "sd15", "--set", "train.max_steps=10")
    assert rc == 0 and "max_steps: 10" in out and "preset: sd15" in out


def test_main_leaves_no_handler_on_the_callers_streams(capsys):
    """In-process callers (tests, notebooks) close the streams main() logged to: no handler may outlive it."""
    import logging

    before = list(logging.getLogger().handlers)
    run_cli(capsys, "config", "--preset", "tiny")
    assert logging.getLogger().handlers == before


def test_status_on_empty_store(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "status", "--storage", str(tmp_path / "s"))
    assert rc == 0
    assert "prompts" in out and "missing" in out and "waiting" in out


@pytest.mark.parametrize("make_args, needle", [
    (lambda t: ["--set", "train.lr=1"], "unknown config key 'train.lr'"),
    (lambda t: ["--set", "masks.backend=nope"], "masks.backend: Input should be 'hf', 'gsam' or 'shapes'"),
    (lambda t: ["--prompts", str(t / "missing.txt")], "matches no file"),
    (lambda t: ["--prompts", str(t / "empty.txt")], "is empty"),
    (lambda t: ["--prompts", str(t / "latin1.txt")], "is not UTF-8"),
    (lambda t: ["--storage", "nosuch://bucket/x"], "is not usable"),
    (lambda t: ["--set", f"models.captioner={t}/no-such-model"], "model path does not exist"),
    (lambda t: ["--stages", "prompts,trian"], "unknown --stages stage(s) trian"),
    (lambda t: ["--config", str(t / "missing.yaml")], "config file not found"),
])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, make_args, needle):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    store = tmp_path / "store"
    args = ["run", "--storage", str(store), *make_args(tmp_path)]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2
    assert needle in err
    assert err.startswith("comat: error: ") and err.count("\n") == 1
    assert no_manifest(store)


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--preset", "sd16"])
    assert e.value.code == 2
    assert "invalid choice: 'sd16'" in capsys.readouterr().err


def test_unreachable_s3_endpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    rc, _, err = run_cli(capsys, "run", "--storage", "s3://comat-test/x",
                         "--set", "storage.options={config_kwargs: {connect_timeout: 1, retries: {max_attempts: 1}}}")
    assert rc == 2 and "not reachable" in err
