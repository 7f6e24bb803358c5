"""The scale-out infrastructure (infra/): compose stack, container images, Kubernetes job template.

No Docker engine, Kubernetes or network here. The files are parsed and checked for the properties
that make them work (services and their order of start, GPU reservation, pinned images, non-root
users, credentials only from .env), `docker compose config` validates the stack where the compose
plugin exists, and the Kubernetes job template goes through Prefect's own code: the server's work-pool
validation, Prefect's JSON-schema validation of job variables, and the job-configuration rendering that
every Prefect worker (the Kubernetes one included) applies before it creates the Job.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "compose" / "docker-compose.yml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
JOB_TEMPLATE = INFRA / "k8s" / "gpu-job-template.json"
DOCKERFILES = {"gpu": INFRA / "docker" / "gpu.Dockerfile", "cpu": INFRA / "docker" / "cpu.Dockerfile"}

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY", re.I)  # credentials
SECRET_VALUE = re.compile(r"PASSWORD|SECRET", re.I)  # credentials that must never have a known value
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; "$$" is a literal "$".
COMPOSE_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
ONLY_A_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")

H100_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


# --------------------------------------------------------------------------- compose helpers


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (the subset the stack uses); a missing required var raises."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$$"  # stays escaped: compose hands "$" to the container's shell
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not value or op == "-" and value is None:
            return arg
        return value or ""

    return COMPOSE_VAR.sub(sub, text)


def _references(text: str) -> list[re.Match]:
    """The ${VAR} references compose substitutes (YAML comment lines are not part of the model)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [m for m in COMPOSE_VAR.finditer(body) if m.group(0) != "$$"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved_compose() -> dict[str, Any]:
    """The stack as compose sees it with the values of .env.example."""
    return yaml.safe_load(_interpolate(COMPOSE_FILE.read_text(), _env_example()))


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def _walk_environments(compose: dict[str, Any]):
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            yield name, key, "" if value is None else str(value)


# --------------------------------------------------------------------------- compose tests


def test_compose_stack_has_its_services_in_start_order(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "prefect-setup", "cpu-worker",
            "gpu-worker"} <= set(services)

    def waits_for(service, dependency, condition):
        return services[service]["depends_on"][dependency]["condition"] == condition

    assert waits_for("prefect-server", "postgres", "service_healthy")
    assert waits_for("minio-init", "minio", "service_healthy")
    assert waits_for("prefect-setup", "prefect-server", "service_healthy")
    for worker in ("cpu-worker", "gpu-worker"):
        assert waits_for(worker, "prefect-server", "service_healthy")
        assert waits_for(worker, "minio-init", "service_completed_successfully")
    for one_shot in ("minio-init", "prefect-setup"):
        assert services[one_shot]["restart"] == "no"
    # Every service a dependant waits on with service_healthy has a healthcheck.
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck", {}).get("test"), f"{dep} needs a healthcheck"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def test_prefect_server_runs_on_postgres_with_the_ui_on_4200(resolved_compose):
    server = resolved_compose["services"]["prefect-server"]
    env = _env_example()
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == (f"postgresql+asyncpg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{env['POSTGRES_DB']}")
    assert "server start" in _command(server) and "--port 4200" in _command(server)
    assert server["ports"] == ["127.0.0.1:4200:4200"]  # loopback unless BIND_ADDRESS says otherwise
    assert server["environment"]["PREFECT_UI_API_URL"] == "http://localhost:4200/api"


def test_telemetry_is_off_in_every_prefect_service(compose):
    prefect_services = {n: s for n, s in compose["services"].items() if s["image"].startswith("comat-")}
    assert {"prefect-server", "prefect-setup", "cpu-worker", "gpu-worker"} <= set(prefect_services)
    for name, service in prefect_services.items():
        assert service["environment"]["DO_NOT_TRACK"] == "1", name
        assert service["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name


def test_workers_poll_their_pools_and_reach_storage_and_cache(resolved_compose):
    services = resolved_compose["services"]
    for pool in ("cpu", "gpu"):
        worker = services[f"{pool}-worker"]
        assert f"worker start --pool {pool} --type process" in _command(worker)
        assert "--with-healthcheck" in _command(worker) and "8080/health" in " ".join(worker["healthcheck"]["test"])
        env = worker["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == _env_example()["COMAT_S3_ACCESS_KEY"]
        assert env["HF_HOME"].startswith("/cache/") and env["COMAT_CACHE"].startswith("/cache/")
        assert "model-cache:/cache" in worker["volumes"]
    assert services["gpu-worker"]["build"]["dockerfile"] == "infra/docker/gpu.Dockerfile"
    assert services["cpu-worker"]["build"]["dockerfile"] == "infra/docker/cpu.Dockerfile"
    assert (COMPOSE_FILE.parent / services["gpu-worker"]["build"]["context"]).resolve() == ROOT


def test_gpu_worker_reserves_nvidia_gpus_counted_from_env(compose, resolved_compose):
    (device,) = compose["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert re.fullmatch(r"\$\{GPU_COUNT(:-all)?\}", str(device["count"]))
    resolved = resolved_compose["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert resolved["count"] == _env_example()["GPU_COUNT"] == "all"
    assert _interpolate("${GPU_COUNT:-all}", {"GPU_COUNT": "2"}) == "2"
    assert "deploy" not in compose["services"]["cpu-worker"]


def test_bucket_and_pipeline_key_are_created_at_start(compose):
    init = compose["services"]["minio-init"]
    script = "\n".join(init["command"])
    assert re.search(r"mc alias set local http://minio:9000", script)
    assert re.search(r'mc mb --ignore-existing "local/\$\$COMAT_BUCKET"', script)
    assert re.search(r'mc admin user add local "\$\$COMAT_S3_ACCESS_KEY"', script)
    assert script.lstrip().startswith("set -e")
    assert init["environment"]["COMAT_BUCKET"] == compose["services"]["cpu-worker"]["environment"]["COMAT_BUCKET"]


def test_setup_creates_both_pools_and_registers_deployments(compose):
    command = _command(compose["services"]["prefect-setup"])
    assert re.search(r"work-pool create gpu --type process --overwrite", command)
    assert re.search(r"work-pool create cpu --type process --overwrite", command)
    assert re.search(r"comat deploy|prefect (--no-prompt )?deploy --all", command)
    assert command.index("work-pool create gpu") < command.index("deploy", command.index("work-pool create cpu"))


def test_no_literal_secrets_only_env_references(compose):
    for service, key, value in _walk_environments(compose):
        if SECRET_NAME.search(key) or key.endswith("_USER"):
            assert ONLY_A_REFERENCE.match(value), f"{service}.{key} must be a ${{VAR}} reference from .env"
        for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", value):
            assert ONLY_A_REFERENCE.match(password), f"{service}.{key} embeds a literal password"
    text = COMPOSE_FILE.read_text()
    for key, value in _env_example().items():
        if value.startswith("change-me"):
            assert value not in text, f"the example value of {key} is written in the compose file"
    # Secrets have no default: a missing .env stops compose instead of starting with a known password.
    for m in _references(text):
        if SECRET_NAME.search(m.group("name")) and m.group("name") != "HF_TOKEN":
            assert m.group("op") == ":?", f"${{{m.group('name')}}} must be required (:?)"
    with pytest.raises(KeyError, match=r"set \w+ in \.env"):
        _interpolate(text, {})


def test_env_example_defines_every_variable_and_env_is_git_ignored():
    example = _env_example()
    referenced = {m.group("name") for m in _references(COMPOSE_FILE.read_text())}
    assert referenced <= set(example), f"missing in .env.example: {sorted(referenced - set(example))}"
    for key, value in example.items():
        if SECRET_VALUE.search(key):
            assert value.startswith("change-me"), f"{key} in .env.example must be a placeholder"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/compose/.env must be git-ignored"
    tracked = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env.example"], cwd=ROOT)
    assert tracked.returncode == 1, ".env.example must stay committable"


def _compose_cli() -> list[str] | None:
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=20)
        if probe.returncode == 0:
            return cli
    return None


def test_docker_compose_config_validates_the_stack(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose plugin or docker-compose binary here; YAML checks above still run")
    # `config` needs no daemon: it interpolates and validates against the compose specification.
    result = subprocess.run(
        [*cli, "--project-directory", str(COMPOSE_FILE.parent), "-f", str(COMPOSE_FILE),
         "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    device = config["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"]


# --------------------------------------------------------------------------- Dockerfiles


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and directives dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG":
            name, _, value = args.partition("=")
            defaults[name] = shlex.split(value)[0] if value else ""
    return defaults


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def _env_pairs(instructions) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_image_is_pinned_non_root_and_starts_a_worker(pool):
    instructions = _dockerfile_instructions(DOCKERFILES[pool])
    keywords = [k for k, _ in instructions]
    args = _arg_defaults(instructions)

    (base,) = [_expand(a, args) for k, a in instructions if k == "FROM"]
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d", tag), f"{pool}: base image {base!r} is not pinned"

    users = [_expand(a, args) for k, a in instructions if k == "USER"]
    assert users, f"{pool}: no USER, the worker would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{pool}: USER must be a numeric non-root uid, got {users[-1]}"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "USER before the last RUN"

    assert "ENTRYPOINT" not in keywords, "an ENTRYPOINT would swallow the flow-run command of Kubernetes jobs"
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == pool and cmd[cmd.index("--type") + 1] == "process"

    env = _env_pairs(instructions)
    assert env["HF_HOME"].startswith("/cache/") and env["COMAT_CACHE"].startswith("/cache/")
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert any(k == "VOLUME" and "/cache" in a for k, a in instructions)

    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert re.search(r"pip install -c \S+ -e \"\.\$\{COMAT_EXTRAS:\+\[\$COMAT_EXTRAS\]\}\"", runs)


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_image_has_no_secrets_and_copies_existing_sources(pool):
    instructions = _dockerfile_instructions(DOCKERFILES[pool])
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            names = [p.split("=", 1)[0] for p in shlex.split(args)]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{pool}: secret baked into the image: {args}"
        if keyword == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"{pool}: COPY {source} but the repository has no {source}"
    text = DOCKERFILES[pool].read_text()
    assert "groundingdino" not in re.sub(r"#.*", "", text).lower()


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_gpu_image_installs_the_pinned_cuda_torch():
    """The GPU image installs constraints.txt as it is: PyPI's torch 2.13.0, the CUDA build."""
    instructions = _dockerfile_instructions(DOCKERFILES["gpu"])
    base = _expand(dict(instructions)["FROM"], _arg_defaults(instructions))
    assert base.startswith("python:3.11"), "the CUDA libraries come as wheels with torch; no CUDA base image"
    assert any(k == "COPY" and "constraints.txt" in a for k, a in instructions)
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "pip install -c constraints.txt -e" in runs and "torch.version.cuda" in runs
    assert "+" not in _pins()["torch"], "a local version tag (+cpu, +cu130) is not on PyPI"


def test_cpu_image_installs_torch_from_the_cpu_index():
    instructions = _dockerfile_instructions(DOCKERFILES["cpu"])
    args = _arg_defaults(instructions)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pins = _pins()
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (pins["torch"], pins["torchvision"])
    runs = [a for k, a in instructions if k == "RUN"]
    torch_install = next(r for r in runs if "TORCH_INDEX_URL" in r)
    package_install = next(r for r in runs if "-e \"." in r)
    assert runs.index(torch_install) < runs.index(package_install)
    assert 'torch==%s' in package_install and "${TORCH_VERSION}" in package_install
    assert "constraints.txt" in package_install


def test_dockerignore_keeps_venv_secrets_and_artifacts_out_of_the_context():
    patterns = {p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")}
    assert {".venv", ".git", ".env", "**/.env", "comat-artifacts"} <= patterns


# --------------------------------------------------------------------------- Kubernetes job template


@pytest.fixture(scope="module")
def job_template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text())


def _render(template: dict[str, Any], values: dict[str, Any]):
    """Render through Prefect's BaseJobConfiguration.from_template_and_values, as a worker does."""
    from prefect.workers.base import BaseJobConfiguration

    class GpuJobConfiguration(BaseJobConfiguration):
        # The fields of the Kubernetes worker's configuration that the template sets.
        job_manifest: dict[str, Any]
        namespace: str = "default"
        annotations: dict[str, str] = {}
        stream_output: bool = True
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int = 60

    class NoApi:
        """Rendering this template must not need the API (no block or variable references)."""

        def __getattr__(self, name):
            raise AssertionError(f"rendering the job template called the Prefect API ({name})")

    return asyncio.run(GpuJobConfiguration.from_template_and_values(template, values, client=NoApi()))


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def test_job_template_is_accepted_as_a_kubernetes_work_pool(job_template):
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import is_valid_schema, validate

    # The server's own check: every {{ placeholder }} of job_configuration is a declared variable.
    pool = WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=job_template)
    assert pool.base_job_template["job_configuration"]["job_manifest"]["kind"] == "Job"
    variables = job_template["variables"]
    is_valid_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    validate(defaults, variables, raise_on_error=True)
    assert {"image", "gpu_count", "node_selector", "tolerations", "memory", "cpu", "namespace",
            "service_account_name", "env", "model_cache_pvc", "image_pull_policy", "finished_job_ttl",
            "command", "labels", "name"} <= set(variables["properties"])

    broken = json.loads(JOB_TEMPLATE.read_text())
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=broken)


@pytest.mark.parametrize("bad", [
    {"gpu_count": -1},
    {"gpu_count": "two"},
    {"memory": "lots"},
    {"cpu": "eight"},
    {"image_pull_policy": "Sometimes"},
    {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]},
    {"node_selector": {"nvidia.com/gpu.count": 8}},
])
def test_job_variables_are_checked_against_the_schema(job_template, bad):
    from prefect.utilities.schema_tools import validate

    good = {"gpu_count": 2, "node_selector": H100_SELECTOR, "tolerations": GPU_TOLERATIONS,
            "memory": "96Gi", "cpu": "16", "image": "registry.example.com/comat-gpu:0.1.0"}
    assert validate(good, job_template["variables"]) == []
    assert validate({**good, **bad}, job_template["variables"]) != []


def test_rendered_job_requests_gpus_on_the_selected_nodes_with_the_cache(job_template):
    values = {"gpu_count": 2, "node_selector": H100_SELECTOR, "tolerations": GPU_TOLERATIONS,
              "image": "registry.example.com/comat-gpu:0.1.0", "memory": "96Gi",
              "model_cache_pvc": "team-model-cache", "namespace": "ml", "env": {"COMAT_LOG": "debug"}}
    config = _render(job_template, values)
    manifest = config.job_manifest
    assert "{{" not in json.dumps(config.model_dump(mode="json"))

    pod = _pod(manifest)
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"] == "96Gi"
    assert pod["nodeSelector"] == H100_SELECTOR
    assert pod["tolerations"] == GPU_TOLERATIONS
    assert container["image"] == "registry.example.com/comat-gpu:0.1.0"
    assert manifest["metadata"]["namespace"] == config.namespace == "ml"

    (cache_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache"]
    (cache_volume,) = [v for v in pod["volumes"] if v["name"] == cache_mount["name"]]
    assert cache_volume["persistentVolumeClaim"]["claimName"] == "team-model-cache"
    shm = next(v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
    assert any(m["name"] == shm["name"] and m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])

    # The deployment's env is merged over the template's defaults (cache paths inside the volume).
    assert config.env["COMAT_LOG"] == "debug"
    assert config.env["HF_HOME"] == "/cache/huggingface" and config.env["COMAT_CACHE"] == "/cache/comat"
    assert container["envFrom"][0]["secretRef"] == {"name": "comat-s3", "optional": True}


def test_rendered_job_meets_the_kubernetes_worker_contract(job_template):
    manifest = _render(job_template, {}).job_manifest
    # What prefect-kubernetes' worker requires of a manifest before it creates the Job.
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = _pod(manifest)
    assert pod["restartPolicy"] == "Never" and pod["parallelism"] == 1 and pod["completions"] == 1
    assert pod["containers"][0]["name"] == "prefect-job"
    # Defaults: one GPU, the usual GPU taint tolerated, the shared cache claim, finished Jobs cleaned up.
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"] == GPU_TOLERATIONS and pod["nodeSelector"] == {}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "comat-model-cache"
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400 and manifest["spec"]["backoffLimit"] == 0
    # Unset optional variables disappear instead of rendering as "None".
    assert "serviceAccountName" not in pod and "args" not in pod["containers"][0]
    assert "{{" not in json.dumps(manifest)


def test_kubernetes_worker_builds_the_final_job(job_template):
    """With prefect-kubernetes installed (the cluster's worker), its own configuration class renders it."""
    worker = pytest.importorskip("prefect_kubernetes.worker", reason="prefect-kubernetes is not installed")
    import uuid

    from prefect.client.schemas.objects import FlowRun

    class NoApi:
        def __getattr__(self, name):
            raise AssertionError(f"rendering the job template called the Prefect API ({name})")

    config = asyncio.run(worker.KubernetesWorkerJobConfiguration.from_template_and_values(
        job_template, {"gpu_count": 4, "node_selector": H100_SELECTOR}, client=NoApi()))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="comat-train", flow_id=uuid.uuid4()))
    container = _pod(config.job_manifest)["containers"][0]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in container["env"]
