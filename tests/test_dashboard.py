"""A real Prometheus with the shipped scrape config and rules, scraping `kaizen serve` and
`kaizen learn` (separate processes) under load: the PromQL an operator relies on answers,
and every panel of the shipped Grafana dashboard returns data.

Slow (a learner has to publish and the server to swap, under a 1 s scrape). With
KAIZEN_DASHBOARD_PNG=path it also draws four of the panels from what Prometheus stored,
the plot in the README's operations section."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from kaizen.auth import local_key
from kaizen.client import Client
from tests.conftest import free_port, wait_until
from tests.test_alerts import alert_names, query, running_prometheus, target_up
from tests.test_e2e import ROOT, kaizen, wait_http

DEPLOY = ROOT / "deploy"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus is not installed (apt-get install prometheus; .ci/run does)",
    ),
]
WINDOW = "30s"  # what $__rate_interval stands for here: a 1 s scrape, a short run


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the shipped dashboard."""
    board = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", WINDOW))
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def scrape_config(tmp_path: Path, server_port: int, learner_port: int) -> Path:
    """The shipped prometheus.yml, its targets pointed at this test's processes, its
    intervals at 1 s, its rules at the shipped alerts.yml."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    targets = {"kaizen-server": server_port, "kaizen-learner": learner_port}
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job.pop("dns_sd_configs", None)  # compose's DNS name `server`; here one local port
            job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def value(port: int, promql: str) -> float:
    """The single number `promql` evaluates to now (NaN when it returns nothing)."""
    result = query(port, "/api/v1/query", query=promql)["result"]
    return float(result[0]["value"][1]) if result else math.nan


def test_prometheus_answers_an_operators_questions_and_every_dashboard_panel(tiny_model, tmp_path):
    port, metrics_port, learner_port = (free_port() for _ in range(3))
    common = ["--model", str(tiny_model), "--buffer", f"sqlite:///{tmp_path}/buffer.db"]
    common += ["--registry", str(tmp_path / "registry")]
    keys, key = local_key(tmp_path / "auth")
    serve_log, learn_log = tmp_path / "serve.log", tmp_path / "learn.log"
    server = kaizen(
        "serve",
        *common,
        *("--auth-keys", str(keys), "--port", str(port), "--metrics-port", str(metrics_port)),
        *("--poll-registry-s", "0.2", "--canary-share", "0"),
        log=serve_log,
    )
    learner = kaizen(
        "learn",
        *common,
        *("--objective", "reinforce", "--publish-every", "8", "--batch-size", "4"),
        *("--batch-wait-s", "0.5", "--poll-s", "0.2", "--metrics-port", str(learner_port)),
        log=learn_log,
    )
    config = scrape_config(tmp_path, metrics_port, learner_port)
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        """Users chatting and reacting, the way a frontend calls kaizen."""
        try:
            with Client(f"127.0.0.1:{port}", key) as client:
                i = 0
                while not stop.is_set():
                    user = f"user-{i % 6}"
                    answer = client.chat("Say hello.", user_id=user, max_new_tokens=8, seed=i + 1)
                    client.feedback(
                        answer.response_id, user_id=user, thumb="up" if i % 3 else "down"
                    )
                    i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    users = threading.Thread(target=load, daemon=True)
    started = time.time()
    try:
        with running_prometheus(config, tmp_path / "tsdb") as prom_port:
            wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 120, server, serve_log)
            wait_http(f"http://127.0.0.1:{learner_port}/metrics", 120, learner, learn_log)
            users.start()

            wait_until(
                lambda: all(target_up(prom_port, f"kaizen-{j}") for j in ("server", "learner")),
                timeout_s=90,
            )
            # the loop turns: a version published, swapped in, and scraped as serving
            wait_until(
                lambda: value(prom_port, "kaizen_serving_version") >= 1 and not errors,
                timeout_s=600,
                what=f"a learned version served (client errors: {errors})",
            )
            time.sleep(5)  # a few more scrapes with the new version serving, under load

            assert value(prom_port, f"sum(rate(kaizen_requests_total[{WINDOW}]))") > 0
            ttft = (
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(kaizen_time_to_first_token_seconds_bucket[{WINDOW}])))"
            )
            assert 0 < value(prom_port, ttft) < math.inf
            lag = "max(kaizen_learner_buffer_head) - max(kaizen_learner_cursor)"
            assert value(prom_port, lag) >= 0
            assert value(prom_port, "max(kaizen_learner_version)") >= 1
            assert value(prom_port, "kaizen_canary_version") == 0  # --canary-share 0: none
            assert value(prom_port, "sum(kaizen_weight_swaps_total)") >= 1

            empty = [
                (title, expr)
                for title, expr in panel_queries()
                if not query(prom_port, "/api/v1/query", query=expr)["result"]
            ]
            assert not empty, f"panels with no data under load: {empty}"

            rules = [r for g in query(prom_port, "/api/v1/rules")["groups"] for r in g["rules"]]
            assert {r["name"] for r in rules} == alert_names()
            unhealthy = [r for r in rules if r["health"] != "ok"]
            assert not unhealthy, unhealthy
            firing = [r["name"] for r in rules if r["state"] == "firing"]
            assert not firing, firing  # a healthy loop under load raises no alert

            if png := os.environ.get("KAIZEN_DASHBOARD_PNG"):
                draw(prom_port, started, time.time(), Path(png))
    finally:
        stop.set()
        users.join(timeout=60)
        for proc in (learner, server):
            proc.terminate()
        for proc in (learner, server):
            proc.wait(timeout=60)
    assert not errors, errors


def draw(port: int, start: float, end: float, png: Path) -> None:
    """Four panels of the dashboard, from what Prometheus stored during the test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Requests/s", f"sum(rate(kaizen_requests_total[{WINDOW}]))"),
        (
            "Time to first token p50 / p99 (s)",
            [
                f"histogram_quantile({q}, sum by (le) "
                f"(rate(kaizen_time_to_first_token_seconds_bucket[{WINDOW}])))"
                for q in (0.5, 0.99)
            ],
        ),
        ("Serving vs learner version", ["kaizen_serving_version", "max(kaizen_learner_version)"]),
        (
            "Learner cursor vs buffer head",
            ["max(kaizen_learner_cursor)", "max(kaizen_learner_buffer_head)"],
        ),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(10, 6))
    for ax, (title, exprs) in zip(axes.flat, panels, strict=True):
        for expr in [exprs] if isinstance(exprs, str) else exprs:
            data = query(port, "/api/v1/query_range", query=expr, start=start, end=end, step=1)
            for series in data["result"]:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=expr if len(expr) < 40 else expr[:37] + "…")
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7)
    figure.suptitle("kaizen under load, from a real Prometheus (tests/test_dashboard.py)")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=80)
