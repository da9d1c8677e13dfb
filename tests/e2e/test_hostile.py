"""A hostile or careless account against a real ejabberd (issue 13): a 1 MB message body
reaches every kind of provider (fakes that refuse what the real ones refuse, oversized
payloads included) and an external app server promptly and within their limits; invalid
app-server JIDs are refused by ejabberd's own rules; one account flooding enables does
not delay another user's pushes. Figures are printed (pytest -s shows them)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import multiprocessing
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from devtools.instance import Instance, free_port
from pymod_push.core.limits import CUT_MARK
from tests.builders import GOOD_JIDS, HOSTILE_JIDS
from tests.conftest import Scenario
from tests.fake_providers import (
    FakeProvider,
    LoopbackCA,
    apns_check,
    fcm_check,
    serve_in_thread,
    ubuntu_check,
    webpush_check,
    wns_check,
)
from tests.xmpp_peers import NS_COMMANDS, NS_DATA, NS_PUSH, Client, Peers, form_fields

pytestmark = pytest.mark.e2e

TOPIC = "org.example.hostile"
MEGABYTE_BODY = "\U0001F600" * 200_000 + "a" * 248_576  # 1 MiB of UTF-8, 4- and 1-byte chars


@dataclass
class Setup:
    scenario: Scenario
    fakes: dict[str, FakeProvider]
    ports: dict[str, int]
    webpush_keys: dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]]


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    folder = Path(tempfile.mkdtemp(prefix="pymod_push-hostile-"))
    folder.chmod(0o755)
    ca = LoopbackCA(folder / "tls")
    apns_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "apns.p8").write_bytes(_pem(apns_key))
    fcm_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vapid_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "vapid.pem").write_bytes(_pem(vapid_key))
    ports = {name: free_port() for name in ("apns", "fcm", "webpush", "wns", "ubuntu",
                                            "metrics")}
    (folder / "sa.json").write_text(json.dumps({
        "type": "service_account", "project_id": "fake-project",
        "client_email": "push@fake-project.iam.gserviceaccount.com",
        "private_key": _pem(fcm_key).decode(),
        "token_uri": f"https://127.0.0.1:{ports['fcm']}/token"}))
    common = {"cafile": str(ca.cafile), "pubsub_host": "pubsub.localhost",
              "register_host": "localhost"}
    backends = [
        {**common, "type": "apns", "app_name": "chatninja", "topic": TOPIC,
         "voip_topic": f"{TOPIC}.voip", "key_file": str(folder / "apns.p8"), "key_id": "K1",
         "team_id": "T1", "endpoint": f"https://127.0.0.1:{ports['apns']}"},
        {**common, "type": "fcm", "app_name": "chatninja",
         "service_account_file": str(folder / "sa.json"),
         "endpoint": f"https://127.0.0.1:{ports['fcm']}"},
        {**common, "type": "webpush", "vapid_private_key_file": str(folder / "vapid.pem"),
         "vapid_subject": "mailto:admin@localhost"},
        {**common, "type": "wns", "app_name": "chatninja", "package_sid": "ms-app://sid",
         "auth_key": "s3cret", "endpoint": f"https://127.0.0.1:{ports['wns']}",
         "channel_domains": ["127.0.0.1"]},
        {**common, "type": "ubuntu", "endpoint": f"https://127.0.0.1:{ports['ubuntu']}"},
    ]
    instance = Instance(folder, options={"endpoint_allow_ips": ["127.0.0.0/8", "::1/128"],
                                         "include_message_bodies": True,
                                         "include_senders": True, "backends": backends,
                                         "metrics_listen": f"127.0.0.1:{ports['metrics']}"},
                        max_stanza_size=4 * 1024 * 1024)
    instance.write_config()
    webpush_keys: dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]] = {}
    fakes = {
        "apns": FakeProvider(apns_check(apns_key.public_key(), "T1", "K1", TOPIC)),
        "fcm": FakeProvider(fcm_check(fcm_key.public_key(),
                                      "push@fake-project.iam.gserviceaccount.com",
                                      "fake-project", ports["fcm"])),
        "webpush": FakeProvider(webpush_check(webpush_keys)),
        "wns": FakeProvider(wns_check("ms-app://sid", "s3cret")),
        "ubuntu": FakeProvider(ubuntu_check),
    }
    for name, fake in fakes.items():
        serve_in_thread(fake, ca, ports[name])
    try:
        instance.start()
        yield Setup(Scenario(instance), fakes, ports, webpush_keys)
    finally:
        instance.discard()
        shutil.rmtree(folder, ignore_errors=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _registration(setup: Setup, kind: str, call: bool) -> dict[str, str | list[str]]:
    if kind == "apns":
        return {"token": "ab" * 32, "voip-token": "cd" * 32} if call else {"token": "ab" * 32}
    if kind == "fcm":
        return {"token": "fcm-token"}
    if kind == "webpush":
        receiver = ec.generate_private_key(ec.SECP256R1())
        auth = b"0123456789abcdef"
        path = f"/sub/{len(setup.webpush_keys)}"
        setup.webpush_keys[path] = (receiver, auth)
        public = receiver.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": f"https://127.0.0.1:{setup.ports['webpush']}{path}",
                "p256dh": _b64(public), "auth": _b64(auth)}
    if kind == "wns":
        return {"token": f"https://127.0.0.1:{setup.ports['wns']}/channel/1"}
    return {"token": "ubuntu-token", "application-id": "app.id_app"}


def _delivered_summary(kind: str, request: Any) -> dict[str, str]:
    if kind == "apns":
        data = dict(request.json())
        data.pop("aps")
        return data
    if kind == "fcm":
        return dict(request.json()["message"]["data"])
    if kind == "webpush":
        return dict(json.loads(request.decrypted))
    if kind == "wns":
        return dict(request.json())
    return dict(request.json()["data"])


async def _first_push(fake: FakeProvider) -> Any:
    """The first request that is a push (not a token request)."""
    for count in itertools.count(1):
        received = await fake.wait_for(count)
        pushes = [r for r in received if r.path not in ("/token", "/accesstoken.srf")]
        if pushes:
            return pushes[0]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("kind", ["apns", "fcm", "webpush", "wns", "ubuntu"])
def test_a_1_mb_body_gives_a_prompt_valid_push_at_every_provider(setup: Setup,
                                                                 kind: str) -> None:
    scenario, fake = setup.scenario, setup.fakes[kind]
    fake.reset()

    async def run(peers: Peers) -> None:
        _, phone, sender = await scenario.cast(peers)
        command = await phone.command("localhost", f"register-push-{kind}",
                                      _registration(setup, kind, call=False))
        result = form_fields(command.find(f"{{{NS_DATA}}}x"))
        await phone.enable_push(result["jid"][0], result["node"][0],
                                secret=result["secret"][0])
        await scenario.go_pending(phone)
        started = time.monotonic()
        sender.send_message(mto=phone.boundjid.full, mbody=MEGABYTE_BODY, mtype="chat")
        push = await _first_push(fake)
        elapsed = time.monotonic() - started
        assert push.refused == "" and push.status < 300, push.refused
        summary = _delivered_summary(kind, push)
        body = summary["last-message-body"]
        assert body.endswith(CUT_MARK) and MEGABYTE_BODY.startswith(body[:-1])
        assert summary["message-count"] == "1"
        print(f"\n1 MB body via {kind}: payload {len(push.body)} bytes, body cut to "
              f"{len(body.encode())} bytes, pushed {elapsed * 1000:.0f} ms after sending")

    scenario.run(run)


def test_a_1_mb_body_gives_a_bounded_publish_to_an_external_app_server(setup: Setup) -> None:
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "big-node", secret="s")
        await scenario.go_pending(phone)
        started = time.monotonic()
        sender.send_message(mto=phone.boundjid.full, mbody=MEGABYTE_BODY, mtype="chat")
        (publish,) = await server.wait_for("big-node", 1)
        elapsed = time.monotonic() - started
        body = publish.summary["last-message-body"]
        assert len(body.encode()) <= 1024 and body.endswith(CUT_MARK)
        assert MEGABYTE_BODY.startswith(body[:-1])
        assert publish.publish_options["secret"] == "s"
        print(f"\n1 MB body to an external app server: body cut to {len(body.encode())} "
              f"bytes, published {elapsed * 1000:.0f} ms after sending")

    scenario.run(run)


def _xml_safe(jid: str) -> bool:
    """What an XML stream can carry at all (no C0 controls but tab, newline, return)."""
    return all(c in "\t\n\r" or (ord(c) >= 0x20 and c not in "\ufffe\uffff") for c in jid)


def test_hostile_push_jids_are_refused_by_ejabberds_rules(setup: Setup) -> None:
    scenario = setup.scenario
    corpus = [jid for jid in HOSTILE_JIDS if _xml_safe(jid)]
    assert len(corpus) >= 50

    async def run(peers: Peers) -> None:
        # Every push IQ counts toward push_iq_rate (60 a minute), refused or not: a new
        # account for each 25 JIDs (at most 50 IQs).
        async def phones() -> AsyncIterator[Client]:
            while True:
                account = await asyncio.to_thread(scenario.account, "jids")
                phone = await peers.user(*account)
                for _ in range(25):
                    yield phone

        phone_for = phones()
        by_whom = {"ejabberd (shim)": 0, "Python": 0}
        for jid in corpus:
            phone = await anext(phone_for)
            try:
                await phone.push_iq(f"<enable xmlns='{NS_PUSH}' jid={quoteattr(jid)} node='n'/>")
            except IqError as error:
                assert error.iq["error"]["condition"] == "jid-malformed", jid
                text = error.iq["error"]["text"]
                by_whom["ejabberd (shim)" if "ejabberd accepts" in text else "Python"] += 1
            else:
                raise AssertionError(f"{jid!r} was accepted")
        for jid in GOOD_JIDS:
            phone = await anext(phone_for)
            await phone.push_iq(f"<enable xmlns='{NS_PUSH}' jid={quoteattr(jid)} node='n'/>")
            await phone.disable_push(jid)
        print(f"\n{len(corpus)} hostile push JIDs refused with jid-malformed: {by_whom}; "
              f"{len(GOOD_JIDS)} ordinary ones accepted")

    scenario.run(run)


def _events_in_python(setup: Setup, kind: str) -> int:
    """How many events of this kind the Python process has handled (its metrics)."""
    url = f"http://127.0.0.1:{setup.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^pymod_push_events_total{{[^}}]*type="{kind}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else 0


def _flood(port: int, jid: str, password: str, stanzas: list[str], ready: Any,
           results: Any) -> None:
    """In a process of its own (the test's event loop must not be the bottleneck): log
    in, send the IQs (ids flood-N) at once, collect the answers."""
    async def main() -> None:
        peers = Peers(port)
        try:
            flooder = await peers.user(jid, password)
            conditions: dict[str, int] = {}
            answered: list[float] = []
            done = asyncio.get_running_loop().create_future()

            def on_answer(iq: Any) -> None:  # one handler: slixmpp's per-IQ ones are O(n)
                if not iq["id"].startswith("flood-") or iq["type"] not in ("result", "error"):
                    return
                condition = iq["error"]["condition"] if iq["type"] == "error" else "result"
                conditions[condition] = conditions.get(condition, 0) + 1
                answered.append(time.monotonic())
                if len(answered) == len(stanzas) and not done.done():
                    done.set_result(None)

            flooder.register_handler(Callback("flood answers", MatchXPath("{jabber:client}iq"),
                                              on_answer))
            ready.set()
            started = time.monotonic()
            for stanza in stanzas:
                flooder.send_raw(stanza)
            await asyncio.wait_for(done, 120)
            results.put((conditions, [t - started for t in answered]))
        finally:
            await peers.close()
    asyncio.run(main())


class Flood:
    """Stanzas (ids flood-N) sent at once by one account from a process of its own."""

    def __init__(self, setup: Setup, jid: str, password: str, stanzas: list[str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.size = len(stanzas)
        self._ready, self._results = context.Event(), context.Queue()
        self.process = context.Process(target=_flood, args=(
            setup.scenario.instance.c2s_port, jid, password, stanzas, self._ready,
            self._results))

    def start(self) -> None:
        self.process.start()
        assert self._ready.wait(30)

    def results(self) -> tuple[dict[str, int], list[float]]:
        """The answers' conditions (or 'result') counted, and when each came (s)."""
        try:
            conditions, answered = self._results.get(True, 120)
        finally:
            self.process.join(30)
        return conditions, answered

    def describe(self, what: str, answered: list[float], conditions: dict[str, int]) -> str:
        tenth = self.size // 10
        start_rate = tenth / max(answered[tenth - 1], 1e-6)
        end_rate = tenth / max(answered[-1] - answered[-tenth - 1], 1e-6)
        return (f"flood of {self.size} {what} from one account: {conditions}; answers/s "
                f"first tenth {start_rate:.0f}, last tenth {end_rate:.0f}, all answered "
                f"after {answered[-1]:.2f} s")


def test_a_flood_of_enables_does_not_delay_another_users_pushes(setup: Setup) -> None:
    """3,000 enables at once from one account: 20 are registered (max_registrations),
    the rest refused with resource-constraint, and all but push_iq_rate of them by the
    shim, so the flood costs the Python process (and other users' pushes) next to
    nothing."""
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        server, victim, sender = await scenario.cast(peers)
        flooder_jid, password = await asyncio.to_thread(scenario.account, "flooder")
        await victim.enable_push(server.boundjid.full, "victim-node")
        await scenario.go_pending(victim)
        node = "victim-node"

        async def latencies(count: int, label: str,
                            until: Any = None) -> list[float]:
            found: list[float] = []
            for number in itertools.count():
                if number >= count and (until is None or not until.is_alive()):
                    break
                already = len(server.received.get(node, []))
                started = time.monotonic()
                sender.send_message(mto=victim.boundjid.full, mbody=f"{label} {number}",
                                    mtype="chat")
                await server.wait_for(node, already + 1)
                found.append(time.monotonic() - started)
                await asyncio.sleep(0.02)
            return found

        quiet = await latencies(20, "quiet")
        flood = Flood(setup, flooder_jid, password, [
            f"<iq type='set' id='flood-{number}'><enable xmlns='{NS_PUSH}' "
            f"jid='app{number % 1000}.example.net' node='n{number}'/></iq>"
            for number in range(3000)])
        seen_before = await asyncio.to_thread(_events_in_python, setup, "PushIq")
        began = time.monotonic()
        await asyncio.to_thread(flood.start)
        during = await latencies(10, "flood", until=flood.process)  # as long as it lasts
        conditions, answered = await asyncio.to_thread(flood.results)
        lasted = time.monotonic() - began
        reached_python = await asyncio.to_thread(_events_in_python, setup,
                                                 "PushIq") - seen_before
        listed = await asyncio.to_thread(scenario.instance.ctl, "push_list",
                                         flooder_jid.split("@")[0], "localhost")
        print(f"\n{flood.describe('enables', answered, conditions)}; "
              f"{reached_python} reached Python; {listed.splitlines()[-1]}")
        print(f"another user's push latency: quiet median {statistics.median(quiet) * 1000:.1f}"
              f" ms max {max(quiet) * 1000:.1f} ms; during the flood ({len(during)} pushes) "
              f"median {statistics.median(during) * 1000:.1f} ms max "
              f"{max(during) * 1000:.1f} ms")
        assert conditions.get("result", 0) == 20  # max_registrations
        assert conditions.get("resource-constraint", 0) == flood.size - 20
        assert "limits: 20 of 20 push registrations" in listed
        # push_iq_rate (60) at once, then one a second: the rest never left ejabberd.
        assert 60 <= reached_python <= 60 + lasted + 1
        quiet_median = statistics.median(quiet)
        delay = statistics.median(during) - quiet_median
        p90 = statistics.quantiles(during, n=10)[-1] - quiet_median
        print(f"delay caused by the flood: median {delay * 1000:.1f} ms, 90th percentile "
              f"{p90 * 1000:.1f} ms")
        assert p90 <= 0.1

    scenario.run(run)


def test_a_flood_of_registration_commands_is_refused_before_python(setup: Setup) -> None:
    """1,000 device registrations at once at the built-in app server from one account:
    max_devices (20) are registered; the rest get resource-constraint, all but
    push_iq_rate of them from the shim without reaching Python."""
    scenario = setup.scenario
    jid, password = scenario.account("registrar")
    stanzas = [
        f"<iq type='set' to='localhost' id='flood-{number}'><command xmlns='{NS_COMMANDS}' "
        f"node='register-push-fcm' action='execute'><x xmlns='{NS_DATA}' type='submit'>"
        f"<field var='token'><value>flood-token-{number}</value></field><field "
        f"var='device-id'><value>device-{number}</value></field></x></command></iq>"
        for number in range(1000)]
    flood = Flood(setup, jid, password, stanzas)
    seen_before = _events_in_python(setup, "AppServerIq")
    began = time.monotonic()
    flood.start()
    conditions, answered = flood.results()
    lasted = time.monotonic() - began
    reached_python = _events_in_python(setup, "AppServerIq") - seen_before
    print(f"\n{flood.describe('registration commands', answered, conditions)}; "
          f"{reached_python} reached Python")
    assert conditions.get("result", 0) == 20  # max_devices
    assert conditions.get("resource-constraint", 0) == flood.size - 20
    assert 60 <= reached_python <= 60 + lasted + 1


def test_push_iqs_and_commands_over_the_rate_are_refused_by_ejabberd(setup: Setup) -> None:
    """push_iq_rate (60 a minute) per account is the shim's rule alone (Python keeps no
    copy): push IQs, and apart from them the app server's commands, beyond it get
    resource-constraint of type wait, naming the option and the seconds to wait; another
    account is not affected, and the flooder gets one a second back."""
    scenario = setup.scenario

    async def run(peers: Peers) -> None:
        flooder = await peers.user(*scenario.account("rate"))
        other = await peers.user(*scenario.account("rate"))
        disable = f"<disable xmlns='{NS_PUSH}' jid='app.example.net'/>"
        list_devices = (f"<command xmlns='{NS_COMMANDS}' node='list-push-registrations' "
                        "action='execute'/>")

        async def burst(xml: str, to: str | None) -> tuple[int, list[Any], float]:
            began = time.monotonic()
            answers = await asyncio.gather(*(flooder.push_iq(xml, to=to) for _ in range(80)),
                                           return_exceptions=True)
            refused = [a.iq["error"] for a in answers if isinstance(a, IqError)]
            assert len(refused) + sum(not isinstance(a, BaseException) for a in answers) == 80
            return 80 - len(refused), refused, time.monotonic() - began

        for xml, to, what in [(disable, None, "push IQs"),
                              (list_devices, "localhost", "registration commands")]:
            accepted, refused, lasted = await burst(xml, to)
            print(f"\n{what}: 80 at once, {accepted} accepted in {lasted:.2f} s")
            assert 60 <= accepted <= 60 + lasted + 1
            assert {(e["type"], e["condition"]) for e in refused} == {
                ("wait", "resource-constraint")}
            text = refused[-1]["text"]
            assert f"too many {what} from this account (option push_iq_rate: 60 a minute)" \
                in text
            found = re.search(r"retry in (\d+) s", text)
            assert found is not None and 1 <= int(found.group(1)) <= 2, text
            wait = int(found.group(1))
            await other.push_iq(xml, to=to)  # another account: its own tokens
            await asyncio.sleep(wait + 0.2)
            await flooder.push_iq(xml, to=to)  # one back

    scenario.run(run)
