"""Real local services for the orchestration tests: a Prefect server and moto's S3 server.

Both listen on 127.0.0.1 only, on free ports. The Prefect server keeps its SQLite database in a
temporary ``PREFECT_HOME`` with analytics off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``,
``DO_NOT_TRACK=1``); moto serves an in-memory S3 with one bucket.

Three ways to use them:

* in Python: ``with local_services() as env: ...`` (``env`` holds the variables below);
* in pytest: the session fixture ``services`` of the orchestration tests calls ``acquire()``, which
  reuses services that ``.ci/run`` started (when ``PREFECT_API_URL`` and ``COMAT_TEST_S3_ENDPOINT``
  are set) or starts them once per test process;
* from a shell (``.ci/run``)::

      python tests/services.py start --env-file /tmp/comat-services.env
      set -a; . /tmp/comat-services.env; set +a
      pytest ...
      python tests/services.py stop --env-file /tmp/comat-services.env

The variables: ``PREFECT_API_URL``, ``COMAT_TEST_S3_ENDPOINT``, ``COMAT_TEST_S3_BUCKET``, and test
credentials ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_DEFAULT_REGION`` (moto accepts any).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

HOST = "127.0.0.1"
BUCKET = "comat-test"
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A server process we started (its own process group, so stopping it takes its children too)."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    workdir: Path | None = None
    extra: dict = field(default_factory=dict)

    def stop(self, timeout: float = 15) -> None:
        stop_pid(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM the process group led by ``pid`` (one we started with a new session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, name: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    stop_pid(proc.pid)
    raise RuntimeError(f"{name} was not healthy after {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")


def _spawn(cmd: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def start_prefect_server(port: int | None = None, timeout: float = 120) -> Service:
    """``prefect server start`` on 127.0.0.1 with SQLite in a fresh temporary PREFECT_HOME."""
    port = port or free_port()
    home = Path(tempfile.mkdtemp(prefix="comat-prefect-home-"))
    env = {**os.environ, **OFFLINE, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    proc = _spawn([str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)], env, log, home)
    url = f"http://{HOST}:{port}/api"
    _wait_http(f"{url}/health", proc, log, timeout, "prefect server")
    return Service("prefect", proc, url, log, workdir=home)


def start_moto(port: int | None = None, bucket: str = BUCKET, timeout: float = 30) -> Service:
    """moto's S3 server on 127.0.0.1 with ``bucket`` created."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="comat-moto-"))
    log = workdir / "moto.log"
    env = {**os.environ, **TEST_CREDENTIALS}
    proc = _spawn([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], env, log, workdir)
    url = f"http://{HOST}:{port}"
    _wait_http(f"{url}/moto-api/", proc, log, timeout, "moto server")
    create_bucket(url, bucket)
    return Service("moto", proc, url, log, workdir=workdir, extra={"bucket": bucket})


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)


def _boto_credentials() -> dict:
    return {"aws_access_key_id": TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": TEST_CREDENTIALS["AWS_DEFAULT_REGION"]}


def service_env(prefect: Service, moto: Service) -> dict[str, str]:
    return {"PREFECT_API_URL": prefect.url, "COMAT_TEST_S3_ENDPOINT": moto.url,
            "COMAT_TEST_S3_BUCKET": moto.extra["bucket"], **TEST_CREDENTIALS, **OFFLINE}


@contextlib.contextmanager
def local_services() -> Iterator[dict[str, str]]:
    """Start both services; yield their environment variables; stop them."""
    moto = start_moto()
    try:
        prefect = start_prefect_server()
    except BaseException:
        moto.stop()
        raise
    try:
        yield service_env(prefect, moto)
    finally:
        prefect.stop()
        moto.stop()


# ---------------------------------------------------------------- pytest sharing
# Several test modules share one pair of services per test process: the first ``acquire`` starts
# them (unless .ci/run already did), the last ``release`` stops what this process started.

_shared: dict = {"count": 0, "env": None, "cm": None}


def acquire() -> dict[str, str]:
    if _shared["env"] is None:
        if os.environ.get("PREFECT_API_URL") and os.environ.get("COMAT_TEST_S3_ENDPOINT"):
            env = {k: os.environ[k] for k in ("PREFECT_API_URL", "COMAT_TEST_S3_ENDPOINT")}
            env.update(COMAT_TEST_S3_BUCKET=os.environ.get("COMAT_TEST_S3_BUCKET", BUCKET), **OFFLINE)
            for k, v in TEST_CREDENTIALS.items():
                env[k] = os.environ.get(k, v)
        else:
            cm = local_services()
            env = cm.__enter__()
            _shared["cm"] = cm
        _shared["env"] = env
    _shared["count"] += 1
    return dict(_shared["env"])


def release() -> None:
    _shared["count"] -= 1
    if _shared["count"] <= 0 and _shared["cm"] is not None:
        cm, _shared["cm"], _shared["env"] = _shared["cm"], None, None
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def services():
    """Session fixture (import it into a test module): both services, with ``PREFECT_API_URL`` and
    the S3 variables in ``os.environ`` (for subprocesses) and in Prefect's settings (for this process)."""
    env = acquire()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env
            _flush_prefect_logs()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        release()


def _flush_prefect_logs() -> None:
    """Send buffered run logs and events while the server is still up (else they fail at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5)


# ---------------------------------------------------------------- command line (.ci/run)

def _cmd_start(env_file: Path) -> int:
    moto = start_moto()
    try:
        prefect = start_prefect_server()
    except BaseException:
        moto.stop()
        raise
    env = service_env(prefect, moto)
    env["COMAT_TEST_SERVICE_PIDS"] = f"{prefect.proc.pid},{moto.proc.pid}"
    env["COMAT_TEST_SERVICE_DIRS"] = f"{prefect.workdir},{moto.workdir}"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    print(f"prefect server {prefect.url}, moto {moto.url}; variables in {env_file}")
    return 0


def _read_env_file(env_file: Path) -> dict[str, str]:
    out = {}
    for line in env_file.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _cmd_stop(env_file: Path) -> int:
    if not env_file.exists():
        print(f"{env_file} does not exist; nothing to stop")
        return 0
    env = _read_env_file(env_file)
    for pid in filter(None, env.get("COMAT_TEST_SERVICE_PIDS", "").split(",")):
        stop_pid(int(pid))
    for d in filter(None, env.get("COMAT_TEST_SERVICE_DIRS", "").split(",")):
        shutil.rmtree(d, ignore_errors=True)
    env_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start or stop the Prefect and moto S3 servers for the tests.")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--env-file", type=Path, required=True, help="KEY=VALUE lines written by start, read by stop")
    args = p.parse_args(argv)
    return _cmd_start(args.env_file) if args.action == "start" else _cmd_stop(args.env_file)


if __name__ == "__main__":
    sys.exit(main())
