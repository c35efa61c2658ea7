"""docker-compose.yml and the Dockerfile agree with the code: settings, commands, images.

No Docker engine runs in the test environment, so the files are read and checked against what
the code accepts: every ``STILLTAG_*`` variable is a setting and parses, every ``stilltag``
command exists with the options given, every dependency waits on a health check.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import typer.main
import yaml

from shared.config import ENV_PREFIX, Settings
from shared.constants import BACKFILL_QUEUE, TAGGING_QUEUE, TRAINING_QUEUE

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's variable substitution with an empty .env: defaults taken, secrets made up."""

    def substitute(match: re.Match) -> str:
        op = match["op"] or ""
        return match["arg"] if op.endswith("-") else f"test-{match['name'].lower().replace('_', '-')}"

    return _INTERPOLATION.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def dockerfile_instruction(name: str) -> str:
    lines = [line for line in DOCKERFILE.splitlines() if line.split(" ", 1)[0].upper() == name]
    assert lines, f"Dockerfile has no {name}"
    return lines[-1].split(" ", 1)[1].strip()


def entrypoint_of(service: dict) -> list[str]:
    if "entrypoint" in service:
        return argv(service["entrypoint"])
    assert "build" in service, "only our own image has a known entrypoint"
    return yaml.safe_load(dockerfile_instruction("ENTRYPOINT"))  # the JSON (exec) form


def stilltag_services() -> dict[str, list[str]]:
    """Services that run ``stilltag ...``, with the arguments after ``stilltag``."""
    found = {}
    for name, service in SERVICES.items():
        if "build" not in service and "stilltag" not in argv(service.get("entrypoint")):
            continue
        full = entrypoint_of(service) + argv(service.get("command"))
        if full and full[0] == "stilltag":
            found[name] = full[1:]
    return found


def resolve_command(args: list[str], *, parse: bool = True) -> list[str]:
    """Walk the ``stilltag`` command tree along ``args``; the command's path, e.g. ``["db", "upgrade"]``.

    With ``parse``, the rest of ``args`` must be valid arguments and options of that command.
    """
    import stilltag.cli  # the whole command line, every package's commands

    # Duck-typed: typer ships its own copy of click, so isinstance(…, click.Group) is unreliable.
    command = typer.main.get_command(stilltag.cli.app)
    path: list[str] = []
    rest = list(args)
    while hasattr(command, "commands"):  # a group
        assert rest, f"`stilltag {' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, (
            f"`stilltag {' '.join([*path, name])}` does not exist; "
            f"`stilltag {' '.join(path)}` has: {', '.join(sorted(command.commands))}"
        )
        path.append(name)
        command = sub
    if not parse:
        return path
    try:
        command.make_context(" ".join(["stilltag", *path]), rest)  # parses options, runs nothing
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # not a usage error
            raise
        raise AssertionError(f"`stilltag {' '.join(args)}`: {exc.format_message()}") from None
    return path


# --- settings ---------------------------------------------------------------------------


def test_every_stilltag_variable_is_a_setting_and_parses(tmp_path):
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    seen = 0
    for name, service in SERVICES.items():
        env = environment(service)
        unknown = sorted(k for k in env if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
        assert not unknown, f"service {name} sets {unknown}, which are not fields of shared.config.Settings"
        values = {k[len(ENV_PREFIX):].lower(): v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}
        values.pop("data_dir", None)  # a container path; the test's own folder stands in for it
        if values:
            Settings(data_dir=tmp_path, **values)  # raises on a value the code would refuse
            seen += 1
    assert seen >= 5, "the stilltag services share their settings through x-stilltag-env"


def test_dockerfile_env_names_are_settings(tmp_path):
    names = re.findall(r"\b(STILLTAG_[A-Z0-9_]+)=", DOCKERFILE)
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert names and set(names) <= known, sorted(set(names) - known)


def test_production_settings_are_the_production_backends(tmp_path):
    env = environment(SERVICES["tagging-worker"])
    s = Settings(data_dir=tmp_path, **{k[len(ENV_PREFIX):].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    assert s.broker_url.startswith("redis://") and urlparse(s.broker_url).hostname == "redis"
    assert s.database_url.startswith("postgresql+psycopg://") and urlparse(s.database_url).hostname == "postgres"
    assert s.image_url == "s3://stills/{image_id}.jpg"
    assert s.model_store == "s3://models"
    assert urlparse(s.s3_endpoint_url).hostname == "minio"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= env.keys()


def test_all_stilltag_services_share_one_environment():
    envs = {name: environment(SERVICES[name]) for name in stilltag_services()}
    assert len({tuple(sorted(e.items())) for e in envs.values()}) == 1, envs


# --- commands ---------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(stilltag_services()))
def test_stilltag_command_exists(service):
    resolve_command(stilltag_services()[service])


def test_command_check_catches_mistakes():
    for wrong in (["db", "downgrade"], ["no-such-command"], ["db"], ["enqueue", "1", "--no-such-option"]):
        with pytest.raises(AssertionError):
            resolve_command(wrong)
    assert resolve_command(["enqueue", "1", "2", "--queue", "backfill"]) == ["enqueue"]


def test_expected_processes_run():
    commands = {name: tuple(args) for name, args in stilltag_services().items()}
    assert commands["migrate"] == ("db", "upgrade")
    assert commands["tagging-worker"] == ("worker", "--queues", f"{TAGGING_QUEUE},{BACKFILL_QUEUE}")
    assert commands["training-worker"] == ("worker", "--queues", TRAINING_QUEUE)
    assert commands["beat"] == ("beat",)


def test_flower_runs_the_celery_app():
    flower = SERVICES["flower"]
    full = entrypoint_of(flower) + argv(flower.get("command"))
    assert full[0] == "celery" and full[1] == "-A" and "flower" in full[3:]
    module = importlib.import_module(full[2])
    from celery import Celery

    assert isinstance(module.app, Celery)
    importlib.import_module("flower")


def test_dockerfile_entrypoint_is_the_declared_script():
    assert dockerfile_instruction("ENTRYPOINT") == '["stilltag"]'
    target = PYPROJECT["project"]["scripts"]["stilltag"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_dockerfile_builds_a_locked_non_root_image():
    assert dockerfile_instruction("FROM").startswith("python:3.11-slim")
    assert "uv sync --frozen --no-dev" in DOCKERFILE
    assert re.search(r"pip install [^\n]*\buv\b", DOCKERFILE)
    user = dockerfile_instruction("USER")
    assert user not in ("root", "0")
    assert (ROOT / ".dockerignore").is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --- images, health, order --------------------------------------------------------------


def test_every_service_has_an_image_that_exists():
    for name, service in SERVICES.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        if "build" in service:
            build = service["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in {context}"
        else:
            tag = service["image"].rsplit("/", 1)[-1]
            assert ":" in tag and not tag.endswith(":latest"), f"{name}: pin the image's tag ({service['image']})"


def test_dependencies_wait_for_health_or_completion():
    for name, service in SERVICES.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions, not a plain list"
        for dep, spec in depends_on.items():
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition")
            one_shot = SERVICES[dep].get("restart", "no") == "no"
            if one_shot:
                assert condition == "service_completed_successfully", f"{name} → {dep}"
            else:
                assert condition == "service_healthy", f"{name} → {dep}"
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_infrastructure_has_health_checks():
    for name in ("redis", "postgres", "minio", "flower"):
        test = SERVICES[name]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert "pg_isready" in SERVICES["postgres"]["healthcheck"]["test"]
    assert SERVICES["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_workers_start_after_migrations_and_buckets():
    for name in ("tagging-worker", "training-worker", "beat"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
        assert {"redis", "postgres", "minio"} <= deps.keys()
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_redis_keeps_queued_messages():
    command = " ".join(argv(SERVICES["redis"]["command"]))
    assert re.search(r"--appendonly\s+yes\b", command)
    assert re.search(r"--maxmemory-policy\s+noeviction\b", command)
    assert any(str(v).endswith(":/data") for v in SERVICES["redis"]["volumes"])


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_tagging_worker_reserves_one_gpu_and_scales():
    worker = SERVICES["tagging-worker"]
    assert gpu_devices(worker) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # --scale makes N containers: no fixed name, no host port.
    assert "container_name" not in worker and "ports" not in worker


def test_buckets_are_created_for_images_and_models():
    init = SERVICES["minio-init"]
    script = " ".join(argv(init.get("entrypoint")) + argv(init.get("command")))
    env = environment(SERVICES["tagging-worker"])
    image_bucket = urlparse(env["STILLTAG_IMAGE_URL"]).netloc
    model_bucket = urlparse(env["STILLTAG_MODEL_STORE"]).netloc
    for bucket in (image_bucket, model_bucket):
        assert re.search(rf"mc mb (--ignore-existing |-p )\S+/{bucket}\b", script), f"bucket {bucket} not created"
    assert init.get("restart", "no") == "no"


def test_gpu_override_pins_one_gpu_per_worker():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        gpu_workers = importlib.import_module("gpu_workers")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    services = gpu_workers.override(["0", "1", "2"])["services"]
    assert services["tagging-worker"] == {"deploy": {"replicas": 0}}
    pinned = {name: gpu_devices(s)[0]["device_ids"] for name, s in services.items() if name != "tagging-worker"}
    assert pinned == {"tagging-worker-gpu0": ["0"], "tagging-worker-gpu1": ["1"], "tagging-worker-gpu2": ["2"]}
    base = SERVICES["tagging-worker"]
    for service in list(services.values())[1:]:
        assert service["command"] == base["command"] and service["environment"] == base["environment"]


# --- worker health, restarts, Prometheus ---------------------------------------------------

WORKERS = ("tagging-worker", "training-worker")
_DURATION = re.compile(r"(\d+)(h|m|s)")


def seconds(duration: str) -> int:
    """A compose duration such as ``90s`` or ``1m30s``, in seconds."""
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def metrics_port() -> int:
    """The workers' STILLTAG_METRICS_PORT, as compose sets it (the same for every worker)."""
    ports = {environment(SERVICES[name]).get(f"{ENV_PREFIX}METRICS_PORT") for name in WORKERS}
    assert len(ports) == 1 and None not in ports, f"set STILLTAG_METRICS_PORT for the workers: {ports}"
    port = int(ports.pop())
    assert port > 0, "STILLTAG_METRICS_PORT=0 turns the health endpoints off"
    return port


def probe_code(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "the image has no curl: probe with python -c"
    return test[3]


@pytest.mark.parametrize("name", WORKERS)
def test_workers_probe_livez_on_the_metrics_port(name):
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe_code(SERVICES[name]))
    assert url, "the health check requests a URL on the container's loopback"
    assert int(url[1]) == metrics_port()
    # /livez: what a restart can fix. /readyz fails while the database or broker is down,
    # and restarting every worker for that only reloads the model (docker-compose.yml).
    assert url[2] == "/livez"


def test_health_check_fails_on_503_and_passes_on_200():
    """The probe itself: urlopen raises on 503, so the command exits non-zero."""
    from shared.health import HealthServer

    verdict = {"ok": True}
    server = HealthServer(0, live=lambda: (verdict["ok"], "test"), host="127.0.0.1").start()
    try:
        code = probe_code(SERVICES["tagging-worker"]).replace(f":{metrics_port()}/", f":{server.port}/")

        def probe() -> int:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

        assert probe() == 0
        verdict["ok"] = False
        assert probe() != 0
    finally:
        server.stop()


def test_worker_health_checks_allow_for_model_loading():
    for name in WORKERS:
        check = SERVICES[name]["healthcheck"]
        assert seconds(check["timeout"]) < seconds(check["interval"]), name
        assert check["retries"] >= 2, f"{name}: one slow answer must not mark it unhealthy"
    # resnet152: fetch ~240 MB from MinIO, unpickle, move to the GPU.
    assert seconds(SERVICES["tagging-worker"]["healthcheck"]["start_period"]) >= 120


@pytest.mark.parametrize("name", WORKERS)
def test_workers_are_restarted_after_any_exit(name):
    # The stall watchdog exits with status 3 (worker/health.py): the policy must restart on a
    # non-zero status, and keep doing so (no on-failure:N limit).
    assert SERVICES[name]["restart"] in ("unless-stopped", "always", "on-failure")


def prometheus_flags() -> dict[str, str]:
    flags = {}
    for arg in argv(SERVICES["prometheus"]["command"]):
        key, _, value = arg.partition("=")
        flags[key] = value
    return flags


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path → (source, mode) for the short volume syntax."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def test_prometheus_loads_the_repository_config_and_rules_read_only():
    flags = prometheus_flags()
    config = Path(flags["--config.file"])
    volumes = mounts(SERVICES["prometheus"])
    source, mode = volumes[str(config.parent)]
    assert mode == "ro"
    folder = ROOT / source
    assert folder.is_dir() and (folder / config.name).is_file(), f"{config} is not mounted from the repository"
    rule_files = yaml.safe_load((folder / config.name).read_text())["rule_files"]
    for rule_file in rule_files:
        # Relative to the config file in the container, and in the mounted folder here.
        assert not Path(rule_file).is_absolute(), rule_file
        assert (folder / rule_file).is_file(), f"rule file {rule_file} is not in {source}"


def test_prometheus_keeps_its_data_long_enough_for_the_retrain_alert():
    flags = prometheus_flags()
    source, _ = mounts(SERVICES["prometheus"])[flags["--storage.tsdb.path"]]
    assert source in COMPOSE["volumes"], "Prometheus's data lives in a named volume"
    retention = flags["--storage.tsdb.retention.time"]
    assert retention.endswith("d") and int(retention[:-1]) > 40  # StilltagNoRecentRetrain looks 40 days back
    assert SERVICES["prometheus"]["restart"] == "unless-stopped"


def test_gpu_override_services_answer_to_the_scaled_name():
    """Prometheus finds tagging workers by the name tagging-worker; the per-GPU services too."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        gpu_workers = importlib.import_module("gpu_workers")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    services = gpu_workers.override(["0", "1"])["services"]
    for name in ("tagging-worker-gpu0", "tagging-worker-gpu1"):
        assert services[name]["networks"] == {"default": {"aliases": ["tagging-worker"]}}
        assert services[name]["healthcheck"] == SERVICES["tagging-worker"]["healthcheck"]


def test_redis_has_blmove():
    # An idle tagging worker waits for uploads with BLMOVE (Redis 6.2 or later, shared/broker.py).
    tag = SERVICES["redis"]["image"].split(":", 1)[1]
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", tag).groups())
    assert (major, minor) >= (6, 2), SERVICES["redis"]["image"]
