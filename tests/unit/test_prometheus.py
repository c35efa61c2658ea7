"""prometheus/: the scrape config reaches every worker, the alert rules use real metrics, and
promtool accepts both and passes the rules' own unit tests (prometheus/alerts*_test.yml).

promtool is Debian's ``prometheus`` package; ``./scripts/test`` installs it when it is missing.
Without it these tests fail (never skip): a rule file that Prometheus refuses loads no alerts.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.unit.test_compose import ROOT, SERVICES, metrics_port

FOLDER = ROOT / "prometheus"
CONFIG = yaml.safe_load((FOLDER / "prometheus.yml").read_text())
RULES = [rule for group in yaml.safe_load((FOLDER / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
WORKER_JOBS = {"tagging-worker", "training-worker"}
PROMTOOL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run ./scripts/test (it installs it), or "
                    "apt-get install --no-install-recommends prometheus")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=FOLDER, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_checks_the_rules(promtool):
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", "alerts.yml")


def test_promtool_checks_the_config_and_finds_its_rule_file(promtool):
    # rule_files are relative to prometheus.yml: the same path in the container and here.
    assert "SUCCESS: 1 rule files found" in run_promtool(promtool, "check", "config", "prometheus.yml")


def test_alert_rules_pass_their_unit_tests(promtool):
    tests = sorted(p.name for p in FOLDER.glob("alerts*_test.yml"))
    assert len(tests) >= 2, tests
    output = run_promtool(promtool, "test", "rules", *tests)
    assert output.count("SUCCESS") == len(tests), output


# --- scraping ---------------------------------------------------------------------------


def jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in CONFIG["scrape_configs"]}


def test_every_tagging_replica_is_scraped_on_the_metrics_port():
    # `--scale` puts several containers behind one name: Docker's DNS lists them all.
    job = jobs()["tagging-worker"]
    assert "static_configs" not in job
    assert job["dns_sd_configs"] == [
        {"names": ["tagging-worker"], "type": "A", "port": metrics_port(), "refresh_interval": "30s"}
    ]
    assert "tagging-worker" in SERVICES and "ports" not in SERVICES["tagging-worker"]


def test_training_worker_and_flower_are_scraped():
    assert jobs()["training-worker"]["static_configs"] == [{"targets": [f"training-worker:{metrics_port()}"]}]
    flower_port = re.search(r"--port=(\d+)", " ".join(SERVICES["flower"]["entrypoint"]))[1]
    assert jobs()["flower"]["static_configs"] == [{"targets": [f"flower:{flower_port}"]}]


def test_scraped_services_exist():
    for job in jobs().values():
        for sd in job.get("dns_sd_configs", []):
            assert set(sd["names"]) <= SERVICES.keys(), sd
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host == "localhost" or host in SERVICES, target


# --- rules ------------------------------------------------------------------------------


def registered_metric_names() -> set[str]:
    """Every sample name the workers export, as Prometheus sees them (``_total``, ``_bucket``...)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import REGISTRY

    import shared.broker  # noqa: F401  (stilltag_parked)
    import training.metrics  # noqa: F401
    import worker.metrics  # noqa: F401
    from shared.health import QueueLengthCollector

    class FakeRedis:  # answers QueueLengthCollector's pipeline
        def pipeline(self, transaction):
            return self

        def llen(self, name):
            pass

        def hlen(self, name):
            pass

        def execute(self):
            return [0] * (len(QueueLengthCollector.QUEUES) + 1)

    extra = CollectorRegistry()
    extra.register(QueueLengthCollector(FakeRedis()))
    names = {"up"}
    for registry in (REGISTRY, extra):
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
    return names


def test_rules_use_metrics_the_workers_export():
    known = registered_metric_names()
    for rule in RULES:
        used = set(re.findall(r"\b(?:up|stilltag_[a-z_]+|process_[a-z_]+)\b(?=[{\[)])", rule["expr"]))
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']} uses {sorted(used - known)}, which no worker exports"


def test_rules_name_only_scraped_jobs():
    for rule in RULES:
        for selector in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert set(selector.split("|")) <= WORKER_JOBS & jobs().keys(), rule["alert"]


def test_each_alert_has_severity_summary_and_description():
    for rule in RULES:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


def test_the_alerts_ops_asked_for():
    by_name = {rule["alert"]: rule for rule in RULES}
    expr = {name: " ".join(rule["expr"].split()) for name, rule in by_name.items()}
    assert by_name["StilltagWorkerDown"]["for"] == "5m" and "up{" in expr["StilltagWorkerDown"]
    assert by_name["StilltagTaggingBacklog"]["for"] == "20m"
    assert expr["StilltagTaggingBacklog"] == 'max(stilltag_queue_length{queue="tagging"}) > 1000'
    assert by_name["StilltagTaggingFailureRatio"]["for"] == "10m" and "> 0.05" in expr["StilltagTaggingFailureRatio"]
    assert "40 * 86400" in expr["StilltagNoRecentRetrain"]
    assert "stilltag_consumer_last_progress_timestamp_seconds" in expr["StilltagWorkerStuck"]
