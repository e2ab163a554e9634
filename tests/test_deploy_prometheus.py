"""deploy/prometheus and deploy/grafana checked by the real tools against the real daemon.

promtool (Debian's `prometheus` package) checks and unit-tests the alert
rules and lints a real /metrics scrape; a real Prometheus server, on loopback
with a temporary config and data dir, scrapes a running tlsproxy, loads the
rules and runs every dashboard query. The metric names of every expression
are checked against the families a real scrape declares.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.deploy.promql import exported_names, metric_names
from tests.helpers import (
    STEP,
    Certs,
    build_config,
    echo_handler,
    free_port,
    raw_connect,
    scrape,
    start_backend,
    start_server,
    tls_connect,
    write_certs,
)

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"
PROMETHEUSRULE = REPO / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
TO_PROMETHEUSRULE = REPO / "deploy" / "prometheus" / "to-prometheusrule.sh"
DASHBOARD = REPO / "deploy" / "grafana" / "tlsproxy.json"

# Values Grafana substitutes for its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$listener": ".*",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed; `make test` installs it (Debian package prometheus)"
    return path


def run_tool(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=STEP, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, label): only the selector is PromQL
            inner = variable["query"]["query"].removeprefix("label_values(").removesuffix(")")
            queries.append(inner.rsplit(",", 1)[0])
    return queries


def grafana_to_promql(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


@pytest.fixture
async def daemon_scrape(tmp_path: Path, nursery: trio.Nursery) -> str:
    """/metrics of a real daemon that has served one TLS connection."""
    certs = write_certs(tmp_path)
    running = await start_server(
        nursery, build_config(certs, await start_backend(nursery, echo_handler))
    )
    tls = await tls_connect(running.port, certs.client_context())
    await tls.aclose()
    await running.access_log(1)
    status, text = await scrape(running.admin_port)
    assert status == 200
    return text


# ---------------------------------------------------------------- promtool


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run_tool(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_has_unit_tests_that_fire_and_stay_silent_and_all_pass() -> None:
    result = run_tool(tool("promtool"), "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr

    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fires == set(), "alerts with no test where they fire"
    assert alerts - silent == set(), "alerts with no test where they stay silent"


def test_prometheusrule_manifest_is_rules_yml_regenerated() -> None:
    result = run_tool("sh", str(TO_PROMETHEUSRULE))
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMETHEUSRULE.read_text(), (
        "deploy/kubernetes/base/prometheusrule.yaml is stale: run "
        "deploy/prometheus/to-prometheusrule.sh > deploy/kubernetes/base/prometheusrule.yaml"
    )
    wrapped = yaml.safe_load(PROMETHEUSRULE.read_text())
    assert wrapped["spec"] == yaml.safe_load(RULES.read_text())


async def test_real_metrics_scrape_passes_promtool_check_metrics(daemon_scrape: str) -> None:
    result = run_tool(tool("promtool"), "check", "metrics", stdin=daemon_scrape)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", "promtool lint findings"


# ---------------------------------------------------------------- metric names


def test_metric_name_extraction_sees_through_promql_syntax() -> None:
    expr = (
        'sum by (job, le) (rate(a_bucket{x="y{z}", w=~"$job"}[$__rate_interval] offset 15m))'
        " / on (job) group_left b_total - time() > 0.8 * 1e3 unless c offset 5m"
        ' and histogram_quantile(0.99, d) or label_replace(e, "dst", "$1", "src", "(.*)")'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d", "e"}


async def test_rules_and_dashboard_use_only_metric_names_the_daemon_exports(
    daemon_scrape: str,
) -> None:
    exported = exported_names(daemon_scrape)
    # declared but without samples yet: the text format still announces it
    assert "tlsproxy_config_reloads_total" in exported

    used = {f"alert {rule['alert']}": metric_names(rule["expr"]) for rule in alert_rules()} | {
        f"dashboard query {query!r}": metric_names(query) for query in dashboard_queries()
    }
    unknown = {where: names - exported for where, names in used.items() if names - exported}
    assert unknown == {}
    assert all(used.values()), "an expression with no metric name: the extraction is broken"


# ---------------------------------------------------------------- a real Prometheus


class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1/"

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = self.base + path + "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=STEP) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                return json.load(exc)

    async def get(self, path: str, **params: str) -> Any:
        return await trio.to_thread.run_sync(self._get, path, params)

    async def poll(self, what: str, path: str, check: Any, **params: str) -> Any:
        """GET until check(body) is true; connection errors, and the plain-text
        answers of a Prometheus still starting ("Service Unavailable"), count
        as not yet."""
        body: Any = None
        with trio.move_on_after(3 * STEP):
            while True:
                try:
                    body = await self.get(path, **params)
                except (OSError, json.JSONDecodeError):
                    body = None
                if body is not None and check(body):
                    return body
                await trio.sleep(0.2)
        raise AssertionError(f"Prometheus never showed {what}; last answer: {body}")


@asynccontextmanager
async def run_prometheus(tmp_path: Path, admin_port: int) -> AsyncIterator[PrometheusAPI]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "tlsproxy",
                        "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
                    }
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        yield PrometheusAPI(port)
    except BaseException:
        print(log.read_text())
        raise
    finally:
        process.terminate()
        with trio.move_on_after(STEP):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def make_handshakes(certs: Certs, port: int, successes: int, plain_http: int) -> None:
    for _ in range(successes):
        tls = await tls_connect(port, certs.client_context())
        await tls.aclose()
    for _ in range(plain_http):
        stream = await raw_connect(port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with suppress(trio.BrokenResourceError):  # a reset is a close too
                while await stream.receive_some(4096):
                    pass  # until the proxy closes


async def test_real_prometheus_scrapes_outcomes_and_runs_every_rule_and_dashboard_query(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    certs = write_certs(tmp_path)
    backend = await start_backend(nursery, echo_handler)
    running = await start_server(nursery, build_config(certs, backend))

    async with run_prometheus(tmp_path, running.admin_port) as prometheus:
        await make_handshakes(certs, running.port, successes=3, plain_http=2)
        await running.access_log(5)

        query = 'tlsproxy_handshakes_total{outcome=~"success|not_tls"}'

        def both_counted(body: Any) -> bool:
            values = {r["metric"]["outcome"]: r["value"][1] for r in body["data"]["result"]}
            return values == {"success": "3", "not_tls": "2"}

        body = await prometheus.poll("both outcomes", "query", both_counted, query=query)
        for series in body["data"]["result"]:
            assert series["metric"]["job"] == "tlsproxy"
            assert series["metric"]["listener"] == "web"

        def all_rules_evaluated(body: Any) -> bool:
            rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
            return len(rules) == len(alert_rules()) and all(
                rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001-")
                for rule in rules
            )

        await prometheus.poll("the rules loaded and evaluated", "rules", all_rules_evaluated)

        for grafana_query in dashboard_queries():
            answer = await prometheus.get("query", query=grafana_to_promql(grafana_query))
            assert answer["status"] == "success", (grafana_query, answer)
