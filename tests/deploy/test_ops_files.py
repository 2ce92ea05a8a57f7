"""The deployment files checked without starting anything: promtool on the Prometheus config and alert rules (and
their unit tests), HAProxy on its config, Compose on docker-compose.yml, and the dashboards against the code.

Fast: the stack itself runs in test_compose.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from services.commands.certs import make_pair
from tests.deploy.docker import REPO, compose_command, engine_missing

PROMETHEUS = REPO / "ops" / "prometheus"
GRAFANA = REPO / "ops" / "grafana"
PYTHON_SERVICES = ("tokenizer", "sampler", "sharder", "gateway", "router", "node")
PUBLISHING = {"router", "loadbalancer", "prometheus", "grafana"}  # Generate, https/wss, Prometheus, Grafana


def check(command: list[str], cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_promtool_accepts_the_config_and_rules_and_every_rule_test_passes() -> None:
    assert "SUCCESS" in check(["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS)
    output = check(["promtool", "check", "rules", *map(str, sorted(PROMETHEUS.glob("rules/*.yml")))])
    assert "SUCCESS: 6 rules found" in output
    assert "SUCCESS" in check(["promtool", "test", "rules", "tests/synapse_test.yml"], cwd=PROMETHEUS)


def test_every_alert_rule_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "synapse.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "tests" / "synapse_test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert names == firing


def test_haproxy_accepts_its_config(tmp_path: Path) -> None:
    certificate, key = make_pair(["synapse.localhost"], days=30)
    (tmp_path / "haproxy.pem").write_bytes(certificate + key)
    config = (REPO / "ops" / "haproxy" / "haproxy.cfg").read_text().replace("/certs/", f"{tmp_path}/")
    (tmp_path / "haproxy.cfg").write_text(config)
    output = check(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], env={"SYNAPSE_HTTPS_PORT": "8443"})
    assert "Configuration file is valid" in output


def compose_file() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_parses_the_file_with_and_without_the_nodes_profile() -> None:
    reason = engine_missing()
    if reason:
        pytest.skip(reason)
    command = compose_command()
    check([*command, "-f", "docker-compose.yml", "config", "--quiet"])
    services = check([*command, "-f", "docker-compose.yml", "--profile", "nodes", "config", "--services"]).split()
    assert {"node", "gateway", "loadbalancer", "grafana"} <= set(services)


def test_every_python_service_has_a_health_check_a_restart_policy_and_only_the_public_ports() -> None:
    services = compose_file()["services"]
    for name in PYTHON_SERVICES:
        service = services[name]
        assert service["restart"] == "unless-stopped", name
        assert "services.common.healthcheck" in service["healthcheck"]["test"], name
    assert {name for name, service in services.items() if service.get("ports")} == PUBLISHING
    assert "ports" not in services["gateway"]  # scalable: no fixed host ports
    assert services["node"]["profiles"] == ["nodes"]
    for name in ("gateway", "router", "node"):
        assert all(dependency["condition"] for dependency in services[name]["depends_on"].values()), name


def metric_names(text: str) -> set[str]:
    """synapse_* metric names in PromQL, without the _bucket/_sum/_count of histograms and summaries."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\bsynapse_\w+", text)}


def exported_metrics() -> set[str]:
    """Every metric name the services define (the first argument of Counter/Gauge/Histogram/Summary)."""
    source = "\n".join(path.read_text() for path in (REPO / "services").rglob("*.py"))
    return set(re.findall(r"(?:Counter|Gauge|Histogram|Summary)\(\s*\"(synapse_\w+)\"", source))


def queries() -> list[str]:
    """The PromQL of every dashboard target and every alert rule."""
    exprs = [
        target["expr"]
        for path in (GRAFANA / "dashboards").glob("*.json")
        for panel in json.loads(path.read_text())["panels"]
        for target in panel.get("targets", [])
    ]
    for path in (PROMETHEUS / "rules").glob("*.yml"):
        exprs += [rule["expr"] for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]
    return exprs


def test_dashboards_and_rules_only_query_metrics_the_services_export() -> None:
    exported = {re.sub(r"_total$", "", name) for name in exported_metrics()}
    used = {re.sub(r"_total$", "", name) for name in metric_names("\n".join(queries()))}
    assert len(used) >= 15 and used <= exported, sorted(used - exported)


def test_dashboard_panels_use_the_provisioned_datasource_and_fit_the_grid() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for path in (GRAFANA / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        panels = dashboard["panels"]
        assert len({panel["id"] for panel in panels}) == len(panels), path
        for panel in panels:
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == uid and panel["description"], panel["title"]
                assert all(target["datasource"]["uid"] == uid for target in panel["targets"]), panel["title"]


def test_the_control_image_requirements_are_pyproject_without_torch() -> None:
    script = REPO / "ops" / "docker" / "requirements.py"
    printed = check([sys.executable, str(script), "--without", "torch"]).split()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert printed == [line for line in dependencies if not line.startswith("torch")]
    assert len(printed) == len(dependencies) - 1
