"""The alert rules operators get: every rule has a promtool case that fires it, the cases
pass, and a real Prometheus loads the rules and scrapes a running server."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from kaizen.sim.demo import free_port
from tests.conftest import ask, wait_until

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
CASES = PROMETHEUS_DIR / "alerts_test.yml"


@contextlib.contextmanager
def running_prometheus(config: Path, data: Path):
    """The Debian `prometheus` binary on a free loopback port with `config` and its own
    data directory (its log beside it); yields the port, stops it at the end."""
    port = free_port()
    with (data.parent / "prometheus.log").open("w") as log:
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield port
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=60)


def target_up(port: int, job: str) -> bool:
    """Whether that Prometheus has scraped `job` and found it up (False while it is not
    listening yet)."""
    try:
        result = query(port, "/api/v1/query", query=f'up{{job="{job}"}}')["result"]
    except OSError:
        return False
    return bool(result) and result[0]["value"][1] == "1"


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_every_alert_rule_has_a_case_that_fires_it():
    cases = yaml.safe_load(CASES.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert len(alert_names()) == 16
    assert alert_names() - fired == set(), "alerts no promtool case ever fires"
    assert fired - alert_names() == set(), "cases for alerts that no longer exist"


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install prometheus; .ci/run does)",
)
def test_the_alert_rules_pass_their_promtool_cases():
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(CASES)]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install prometheus; .ci/run does)",
)
def test_promtool_finds_nothing_to_fix_in_what_the_server_and_learner_export(server, stubs):
    """Names, units and help texts by Prometheus' conventions, with the series that
    traffic creates (an answer, a refusal) present."""
    import grpc

    import learner.metrics  # noqa: F401 - this process's registry then holds the learner's

    stubs.chat.Generate(ask())
    with pytest.raises(grpc.RpcError):  # a refusal: it adds an error series
        stubs.chat.Generate(ask(max_new_tokens=10_000))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        exported = response.read()
    assert b"kaizen_requests_total" in exported and b"kaizen_learner_" in exported
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=exported, capture_output=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def query(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (apt-get install prometheus; .ci/run does)",
)
def test_a_real_prometheus_scrapes_the_server_and_evaluates_the_rules(server, tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "kaizen-server",
                        "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
                    }
                ],
            }
        )
    )

    def evaluated(port: int) -> list[dict]:
        """Every rule, once each has been evaluated (before that: [])."""
        groups = query(port, "/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        never = "0001-01-01T00:00:00Z"  # Prometheus's zero time
        return rules if rules and all(r["lastEvaluation"] != never for r in rules) else []

    with running_prometheus(config, tmp_path / "data") as port:
        wait_until(
            lambda: target_up(port, "kaizen-server"),
            timeout_s=60,
            what="Prometheus scraping the server",
        )
        serving = query(port, "/api/v1/query", query="kaizen_serving_version")["result"]
        assert serving and serving[0]["value"][1] == "0"
        build = query(port, "/api/v1/query", query="kaizen_build_info")["result"]
        assert build and build[0]["metric"]["version"]
        wait_until(lambda: len(evaluated(port)) > 0, timeout_s=30, what="the rules evaluated")
        rules = evaluated(port)
        assert {r["name"] for r in rules} == alert_names()
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        # a healthy, idle server: nothing pending, nothing firing
        assert all(r["state"] == "inactive" for r in rules), [
            r["name"] for r in rules if r["state"] != "inactive"
        ]
