"""examples/prometheus/alerts.yml and examples/grafana/pymod_push.json: the rules load in
Prometheus' own checker, fire on the series that should make them fire (promtool test
rules), and every expression names only metrics that pymod_push serves. The end-to-end test
(tests/e2e/test_prometheus.py) evaluates them all on a real scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from pymod_push.metrics import COMMIT_BUCKETS, Histogram, Snapshot, render

ROOT = Path(__file__).resolve().parent.parent.parent
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "examples" / "grafana" / "pymod_push.json"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed (Debian's prometheus): run the tests with "
                    "'make test'")
    return found


def served_metrics() -> set[str]:
    """Every series name the exposition can hold, from a snapshot with everything in it."""
    latency = Histogram()
    latency.observe(0.1)
    text = render(Snapshot(
        "h", Counter({"StanzaToPending": 1}), Counter({"published": 1}),
        Counter({("apns", "delivered"): 1}), {"apns": latency},
        {"registrations": 1, "database_round_trips": 1}, 1, Histogram(COMMIT_BUCKETS), "1",
        {"restarts": 1, "held": 1, "dropped": 1}, {("a", "p"): time.time()}, 0))
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"])
            for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel.get("targets", [])]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_expression_names_served_metrics() -> None:
    served = served_metrics()
    expressions = [(rule["alert"], str(rule["expr"])) for rule in alert_rules()]
    expressions += dashboard_expressions()
    assert expressions
    for name, expr in expressions:
        names = set(re.findall(r"\bpymod_push_\w+", expr))
        assert names, name
        assert names <= served, (name, names - served)


def test_the_dashboard_has_what_the_bundle_promises() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    expressions = " ".join(expr for _, expr in dashboard_expressions())
    for metric in ("pymod_push_provider_pushes_total", "pymod_push_provider_latency_seconds_bucket",
                   "pymod_push_outbox", "pymod_push_provider_queue", "pymod_push_publishes_total",
                   "pymod_push_database_commit_seconds", "pymod_push_python_restarts_total",
                   "pymod_push_shim_held_events_total", "pymod_push_shim_dropped_events_total"):
        assert metric in expressions, metric
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# promtool's unit tests of the rules: series over time, and the alerts they must (and must
# not) fire. One sample a minute; values 'a+bxN' grow by b for N minutes.
RULE_TESTS = """
rule_files: [ALERTS]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'pymod_push_provider_pushes_total{host="h",provider="apns",outcome="delivered"}'
        values: '0+10x40'
      - series: 'pymod_push_provider_pushes_total{host="h",provider="apns",outcome="failed"}'
        values: '0+5x40'
      - series: 'pymod_push_provider_pushes_total{host="h",provider="fcm",outcome="delivered"}'
        values: '0+10x40'
      - series: 'pymod_push_provider_pushes_total{host="h",provider="fcm",outcome="unregistered"}'
        values: '0+5x40'
      - series: 'pymod_push_python_restarts_total{host="h"}'
        values: '0 1 2 3 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4'
      - series: 'pymod_push_shim_dropped_events_total{host="h"}'
        values: '0x20 0+3x20'
      - series: 'pymod_push_outbox{host="h"}'
        values: '200+10x70'
      - series: 'pymod_push_provider_queue{host="h"}'
        values: '500x70'
      - series: 'pymod_push_app_server_registrations_without_device{host="h"}'
        values: '2x70'
      - series: 'pymod_push_apns_certificate_expiry_seconds{host="h",app_name="a",pubsub_host="p"}'
        values: '1213000-60x70'  # 14 days are 1209600 s
      - series: 'pymod_push_database_commit_seconds_bucket{host="h",le="0.1"}'
        values: '0+1x40'
      - series: 'pymod_push_database_commit_seconds_bucket{host="h",le="0.25"}'
        values: '0+100x40'
      - series: 'pymod_push_database_commit_seconds_bucket{host="h",le="+Inf"}'
        values: '0+100x40'
    alert_rule_test:
      - eval_time: 40m
        alertname: PushProviderFailing
        exp_alerts:  # APNs fails a third; FCM's gone devices are no failures
          - exp_labels: {severity: warning, host: h, provider: apns}
      - eval_time: 5m
        alertname: PushPythonRestarting
        exp_alerts:
          - exp_labels: {severity: critical, host: h}
      - eval_time: 30m
        alertname: PushPythonRestarting
        exp_alerts: []
      - eval_time: 10m
        alertname: PushShimDroppingEvents
        exp_alerts: []
      - eval_time: 30m
        alertname: PushShimDroppingEvents
        exp_alerts:
          - exp_labels: {severity: critical, host: h}
      - eval_time: 65m
        alertname: PushQueuesGrowing
        exp_alerts:  # the outbox grows; the provider queue is long but steady
          - exp_labels: {severity: warning, host: h}
      - eval_time: 30m
        alertname: PushAppServerRegistrationsWithoutDevice
        exp_alerts: []
      - eval_time: 65m
        alertname: PushAppServerRegistrationsWithoutDevice
        exp_alerts:
          - exp_labels: {severity: info, host: h}
      - eval_time: 30m
        alertname: ApnsCertificateExpiresSoon
        exp_alerts: []
      - eval_time: 65m
        alertname: ApnsCertificateExpiresSoon
        exp_alerts:
          - exp_labels: {severity: warning, host: h, app_name: a, pubsub_host: p}
      - eval_time: 65m
        alertname: ApnsCertificateExpiresVerySoon
        exp_alerts: []
      - eval_time: 30m
        alertname: PushCommitsSlow
        exp_alerts:
          - exp_labels: {severity: warning, host: h}
"""


def test_the_rules_fire_when_they_should(tmp_path: Path) -> None:
    """The rules as they are, but for their annotations (promtool compares them too; their
    templates are checked by promtool check rules)."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.replace("ALERTS", str(tmp_path / "alerts.yml")))
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
