"""The observability bundle against a real Prometheus (Debian's package): it scrapes a running
ejabberd with the module (metrics_listen) while pushes go through the built-in app server (one
provider failure among them) and the Python process is killed and restarted; then every
panel of examples/grafana/pymod_push.json and every rule of examples/prometheus/alerts.yml is
evaluated through Prometheus' query API, and each must parse and return data."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.instance import Instance, free_port
from tests.conftest import Scenario
from tests.fake_providers import FakeProvider, fake_apns
from tests.unit.test_alerts import ALERTS, DASHBOARD
from tests.unit.test_observability import certificate
from tests.xmpp_peers import NS_DATA, Peers, form_fields

pytestmark = pytest.mark.e2e

TOPIC = "org.example.chatninja"
GOOD, BAD = "ab" * 32, "cd" * 32  # device tokens: the fake APNs refuses BAD's pushes
SCRAPE_S = 1
# Grafana's variables, as concrete values: a range holding the whole run, every host. (A
# shorter one fails on a slow machine: once the first process's increase has left the range,
# the restarted process's histogram shows no increase and its quantiles are NaN.)
VARIABLES = {"$__rate_interval": "15m", "$__interval": "15m", "$host": ".*"}
# A comparison of an alert's expression with a number: what makes a healthy run's alert
# condition empty. Left out, the expression shows what the alert looks at.
COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.\[])")
FIRING = {  # what this run makes true
    "PushProviderFailing",  # half the pushes fail
    "PushAppServerRegistrationsWithoutDevice",  # a registration with a node nobody registered
    "ApnsCertificateExpiresSoon", "ApnsCertificateExpiresVerySoon",  # 2 days left
}
QUIET = {"PushShimDroppingEvents", "PushQueuesGrowing"}  # what it must not


@dataclass
class Setup:
    instance: Instance
    apns: FakeProvider
    metrics_port: int


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (Debian's package): run the tests with "
                    "'make test'")
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-prometheus-"))
    folder.chmod(0o755)
    apns, backend = fake_apns(folder, "chatninja", TOPIC)
    apns.answers[f"/3/device/{BAD}"] = (400, {"reason": "BadTopic"})
    cert = certificate(folder / "apns-cert.pem", datetime.now(UTC) + timedelta(days=2))
    user = pwd.getpwnam("ejabberd")
    os.chown(cert, user.pw_uid, user.pw_gid)  # 0600, the ejabberd user's
    metrics_port = free_port()
    options = {"metrics_listen": f"127.0.0.1:{metrics_port}", "backends": [
        backend,
        {"type": "apns", "app_name": "certapp", "register_host": "certs.localhost",
         "pubsub_host": "pubsub.localhost", "topic": "org.example.certapp",
         "certfile": str(cert), "endpoint": f"https://127.0.0.1:{free_port()}"}]}
    instance = Instance(folder, options=options)
    instance.write_config()
    try:
        instance.start()
        yield Setup(instance, apns, metrics_port)
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


class Prometheus:
    """prometheus on 127.0.0.1:<free port>, its storage in a folder of its own, scraping
    the module's metrics_listen every SCRAPE_S."""

    def __init__(self, folder: Path, target: str) -> None:
        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s",
                       "scrape_timeout": f"{SCRAPE_S}s"},
            "scrape_configs": [{"job_name": "pymod_push",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder}/data",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query at the current time: {"resultType", "result"}; an expression that
        does not parse fails here with Prometheus' error."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: {exc.read().decode()}") from None
        assert answer["status"] == "success", (expr, answer)
        return dict(answer["data"])

    def values(self, expr: str) -> list[float]:
        data = self.query(expr)
        assert data["resultType"] == "vector", (expr, data)
        return [float(sample["value"][1]) for sample in data["result"]]

    def wait_until(self, what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except (OSError, AssertionError):
                pass  # not listening yet, the series not there yet
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            time.sleep(0.2)

    def scraped_after(self, moment: float) -> bool:
        """A scrape of the module's metrics started after this time (epoch seconds)."""
        return any(v > moment for v in self.values("timestamp(pymod_push_build_info)"))


def concrete(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def has_data(prometheus: Prometheus, expr: str) -> list[float]:
    values = prometheus.values(expr)
    assert values, f"no data: {expr}"
    assert any(math.isfinite(v) for v in values), f"no number: {expr} -> {values}"
    return values


def test_every_panel_and_alert_returns_data(setup: Setup, tmp_path: Path) -> None:
    instance = setup.instance
    scenario = Scenario(instance)
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{setup.metrics_port}")
    try:
        prometheus.wait_until("the module scraped", lambda: prometheus.values(
            'up{job="pymod_push"}') == [1.0])
        setup.apns.reset()
        setup.apns.answers[f"/3/device/{BAD}"] = (400, {"reason": "BadTopic"})

        async def pushes(peers: Peers) -> None:
            _, phone, sender = await scenario.cast(peers)
            for token in (GOOD, BAD):  # two devices of one session, one of them refused
                registered = await phone.command("localhost", "register-push-apns",
                                                 {"token": token, "device-id": token[:2]})
                fields = form_fields(registered.find(f"{{{NS_DATA}}}x"))
                await phone.enable_push("pubsub.localhost", fields["node"][0],
                                        secret=fields["secret"][0])
            # Someone who never goes pending enables a node nobody registered: no push
            # ever tells the app server it has no device for it.
            await sender.enable_push("pubsub.localhost", "no-such-device")
            await scenario.go_pending(phone)
            sender.send_message(mto=phone.boundjid.full, mbody="one", mtype="chat")
            await setup.apns.wait_for(2)
            # Python is killed: the shim holds what comes meanwhile and restarts it.
            pid = instance.python_pid()
            assert pid is not None
            mark = instance.log_mark()
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(instance.wait_for_log, "Python process exited with status",
                                    mark)
            sender.send_message(mto=phone.boundjid.full, mbody="two", mtype="chat")
            await setup.apns.wait_for(4, timeout=60)

        scenario.run(pushes)
        done = time.time()
        assert sorted(r.status for r in setup.apns.received) == [200, 200, 400, 400]
        prometheus.wait_until("the restart scraped", lambda: prometheus.values(
            "pymod_push_python_restarts_total") >= [1.0] and prometheus.values(
            "pymod_push_shim_held_events_total") >= [1.0])
        # Rates need two samples of the series that appeared last.
        prometheus.wait_until("scraped since", lambda: prometheus.scraped_after(
            done + 3 * SCRAPE_S))

        dashboard = json.loads(DASHBOARD.read_text())
        panels = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
        assert len(panels) >= 9
        for _, expr in panels:
            has_data(prometheus, concrete(expr))

        rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
                 for rule in group["rules"]]
        assert FIRING | QUIET <= {rule["alert"] for rule in rules}
        for rule in rules:
            expr = str(rule["expr"])
            condition = prometheus.query(expr)  # parses, whatever it finds
            looked_at = COMPARISON.sub("", expr)
            assert looked_at != expr, rule["alert"]  # a condition: its comparison left out
            has_data(prometheus, looked_at)
            if rule["alert"] in FIRING:
                assert condition["result"], (rule["alert"], "does not fire")
            if rule["alert"] in QUIET:
                assert condition["result"] == [], (rule["alert"], condition["result"])
        # Counted by the shim: no reset across the Python processes (Python's own counters,
        # such as pymod_push_events_total, start again from 0 with each process).
        assert prometheus.values("resets(pymod_push_python_restarts_total[5m])") == [0.0]
        assert prometheus.values("resets(pymod_push_shim_held_events_total[5m])") == [0.0]
    finally:
        prometheus.stop()
