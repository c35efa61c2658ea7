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


def exported_families() -> list:
    """Every metric family the workers export (tagging, training, broker, queue lengths)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import REGISTRY

    import shared.broker  # noqa: F401  (stilltag_parked)
    import training.metrics  # noqa: F401
    import worker.metrics  # noqa: F401
    from shared.health import QueueCollector

    class FakeRedis:  # answers the collector's pipeline: 0 for every command queued
        queued = 0

        def pipeline(self, transaction):
            self.queued = 0
            return self

        def llen(self, name):
            self.queued += 1

        def hlen(self, name):
            self.queued += 1

        def get(self, name):
            self.queued += 1

        def execute(self):
            return [0] * self.queued

    extra = CollectorRegistry()
    extra.register(QueueCollector(FakeRedis()))
    return [family for registry in (REGISTRY, extra) for family in registry.collect()]


def registered_metric_names() -> set[str]:
    """Every sample name, as Prometheus sees them (``_total``, ``_bucket``...), and ``up``."""
    return {"up"} | {sample.name for family in exported_families() for sample in family.samples}


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


def test_readme_lists_every_metric_and_alert():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Operating the workers\n(.*?)(?=^## |\Z)", readme, flags=re.M | re.S)
    assert section, "README.md has no '## Operating the workers' section"
    documented = set(re.findall(r"^\| `(stilltag_[a-z_]+)` \|", section[1], flags=re.M))
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in exported_families() if family.name.startswith("stilltag_")}
    assert documented == exported, (f"README's metrics table: missing {sorted(exported - documented)}, "
                                    f"unknown {sorted(documented - exported)}")
    alerts = set(re.findall(r"^\| `(Stilltag\w+)` \|", section[1], flags=re.M))
    assert alerts == {rule["alert"] for rule in RULES}


def test_readme_queries_parse(promtool, tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Operating the workers\n.*?^```promql\n(.*?)^```", readme, flags=re.M | re.S)
    assert block, "README's Operating section has no promql block"
    queries = [line.split("#")[0].strip() for line in block[1].splitlines() if line.strip()]
    assert len(queries) >= 4
    rules = {"groups": [{"name": "readme", "rules": [{"record": f"readme:query{i}", "expr": q}
                                                     for i, q in enumerate(queries)]}]}
    (tmp_path / "readme.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "readme.yml")], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    used = {name for q in queries for name in re.findall(r"\bstilltag_[a-z_]+\b", q)}
    assert used <= registered_metric_names(), sorted(used - registered_metric_names())
