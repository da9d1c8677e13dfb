"""ejabberd as a UnifiedPush server (issue 33), end to end: a slixmpp client behaving as
Conversations the distributor (tests/unifiedpush_peers.py) and an app server's HTTP POSTs
to ejabberd's own HTTP listener on loopback.

One ejabberd with UnifiedPush on (a small unified_push_max_kept, an access rule refusing
the users named noup*) serves most tests; the ones that kill Python or restart ejabberd
have one of their own."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devtools.instance import Instance, free_port
from pymod_push.core.push_history import short_hash
from tests.conftest import Scenario, _instance
from tests.unifiedpush_peers import (
    NS_UP,
    Answer,
    Distributor,
    Registered,
    distributor,
    go_offline,
    go_pending,
    http_request,
    http_waiting,
    post,
    request,
    session_state,
    unacked,
    wait_until,
)
from tests.xmpp_peers import TIMEOUT, Peers

pytestmark = pytest.mark.e2e

MAX_KEPT = 4
MAX_ENDPOINTS = 5
UP_OPTIONS: dict[str, Any] = {"unified_push_max_kept": MAX_KEPT,
                              "unified_push_max_endpoints": MAX_ENDPOINTS,
                              "unified_push_access": "unified_push_users"}
UP_CONFIG: dict[str, Any] = {
    "acl": {"local": {"user_regexp": ""}, "noup": {"user_regexp": "^noup"}},
    "access_rules": {"unified_push_users": {"deny": "noup", "allow": "local"}},
}
DEFAULT_TTL = 86400  # unified_push_max_ttl's default: the TTL of a POST without one
FAST = 8.0  # seconds: a POST is answered once stored, not held (the shim's limit is 10 s)


def _up_instance(options: dict[str, Any], prefix: str,
                 other_hosts: tuple[str, ...] = ()) -> Iterator[Instance]:
    config = {**UP_CONFIG, "hosts": ["localhost", *other_hosts]} if other_hosts else UP_CONFIG
    yield from _instance(options, prefix=prefix, ready_hosts=other_hosts, unified_push=True,
                         extra_config=config)


@pytest.fixture(scope="session")
def ejabberd_up() -> Iterator[Instance]:
    yield from _up_instance({**UP_OPTIONS, "metrics_listen": f"127.0.0.1:{free_port()}"},
                            "pymod_push-up-")


@pytest.fixture
def up(ejabberd_up: Instance) -> Scenario:
    return Scenario(ejabberd_up)


@pytest.fixture(scope="module")
def ejabberd_up_chaos() -> Iterator[Instance]:
    """For the tests that kill Python or restart ejabberd."""
    yield from _up_instance(UP_OPTIONS, "pymod_push-upchaos-")


@pytest.fixture
def chaos(ejabberd_up_chaos: Instance) -> Scenario:
    return Scenario(ejabberd_up_chaos)


async def up_user(scenario: Scenario, peers: Peers, prefix: str = "up",
                  resource: str | None = None) -> Distributor:
    jid, password = await asyncio.to_thread(scenario.account, prefix)
    return await distributor(peers, f"{jid}/{resource or 'Conversations.' + prefix}", password)


async def registered(client: Distributor, app: str = "org.example.app",
                     connector: str = "token-1") -> Registered:
    return await client.register_up(*client.hashes(app, connector))


async def posted(url: str, body: bytes, headers: dict[str, str] | None = None,
                 **kwargs: Any) -> Answer:
    """A POST that must be accepted, and answered at once."""
    answer = await asyncio.wait_for(post(url, body, headers, **kwargs), FAST)
    assert answer.status == 201, (answer.status, answer.body)
    return answer


def b64url_nopad(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def marker_once(client: Distributor, url: str, sent: list[bytes]) -> bytes:
    """POST a marker and wait for it: everything sent before it has arrived by then (one
    stream, in order). Each payload arrived exactly once, in the order sent."""
    marker = b"marker-" + secrets.token_bytes(8)
    await posted(url, marker)
    await client.wait_payload(marker)
    assert client.payloads() == [*sent, marker]
    return marker


# ------------------------------------------------------------------ register


def test_register_gives_a_stable_endpoint_for_seven_days(up: Scenario) -> None:
    instance = up.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers, resource="Conversations.A")
        before = datetime.now(UTC)
        first = await registered(phone)
        after = datetime.now(UTC)
        assert first.endpoint.startswith(instance.up_url + "/")
        host_part, secret_part = first.token.split(".")
        assert b64url_decode(host_part) == instance.host.encode()
        assert len(b64url_decode(secret_part)) == 32  # 256 random bits
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first.expiration)
        week = timedelta(days=7)
        assert before + week - timedelta(seconds=2) <= first.expires <= after + week

        renewed = await registered(phone)
        assert renewed.endpoint == first.endpoint
        assert renewed.expires >= first.expires
        other_app = await registered(phone, "org.example.other")
        assert other_app.endpoint != first.endpoint
        other_instance = await registered(phone, connector="token-2")
        assert other_instance.endpoint not in (first.endpoint, other_app.endpoint)

        # Another user with the very same hashes: an endpoint of its own.
        someone = await up_user(up, peers)
        someone.account_uuid = phone.account_uuid
        assert (await registered(someone)).endpoint != first.endpoint

        # The same account from a new resource (a new install, same hashes): same
        # endpoint, and the pushes go to the new resource only.
        jid = f"{phone.boundjid.bare}/Conversations.B"
        tablet = await distributor(peers, jid, phone.password)
        tablet.account_uuid = phone.account_uuid
        moved = await registered(tablet)
        assert moved.endpoint == first.endpoint
        await posted(first.endpoint, b"to the new resource")
        await tablet.wait_pushes(1)
        (push,) = tablet.pushes
        assert push.to == jid and push.sender == instance.host
        assert (push.application, push.instance) == phone.hashes("org.example.app")
        await marker_once(tablet, first.endpoint, [b"to the new resource"])
        assert phone.pushes == []

    up.run(run)


def test_the_host_advertises_the_namespace(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        info = await phone.plugin["xep_0030"].get_info(jid=up.host, timeout=TIMEOUT)
        assert NS_UP in info["disco_info"]["features"]

    up.run(run)


def test_without_unified_push_url_the_feature_is_off(scenario: Scenario) -> None:
    """conftest's ejabberd: mod_push_py without unified_push_url."""
    async def run(peers: Peers) -> None:
        jid, password = await asyncio.to_thread(scenario.account, "plain")
        phone = await distributor(peers, jid, password)
        info = await phone.plugin["xep_0030"].get_info(jid=scenario.host, timeout=TIMEOUT)
        assert NS_UP not in info["disco_info"]["features"]
        application, instance_hash = phone.hashes("org.example.app")
        _, condition, _ = await phone.register_error(
            f"<register xmlns='{NS_UP}' application='{application}' "
            f"instance='{instance_hash}'/>")
        assert condition in ("service-unavailable", "feature-not-implemented")

    scenario.run(run)


def test_register_refusals(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        application, instance_hash = phone.hashes("org.example.app")

        def register(app: str, inst: str) -> str:
            return f"<register xmlns='{NS_UP}' application='{app}' instance='{inst}'/>"

        error_type, condition, text = await phone.register_error(
            register("not base64!", instance_hash))
        assert (error_type, condition) == ("modify", "bad-request")
        assert text.startswith("application")
        short = base64.b64encode(bytes(31)).decode()
        error_type, condition, text = await phone.register_error(register(application, short))
        assert (error_type, condition) == ("modify", "bad-request")
        assert text.startswith("instance")
        # base64url is not what Conversations sends
        url_safe = base64.urlsafe_b64encode(b"\xfb" * 32).decode()
        assert (await phone.register_error(register(application, url_safe)))[1] \
            == "bad-request"
        error_type, condition, _ = await phone.register_error(
            register(application, instance_hash), iq_type="get")
        assert condition == "bad-request"

        # unified_push_access denies the users named noup*
        denied = await up_user(up, peers, prefix="noup")
        error_type, condition, _ = await denied.register_error(
            register(*denied.hashes("org.example.app")))
        assert (error_type, condition) == ("auth", "forbidden")
        # and it still works for the others
        assert (await phone.register_up(application, instance_hash)).endpoint

    up.run(run)


def test_at_most_max_endpoints_per_account(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoints = [await registered(phone, f"org.example.app{n}")
                     for n in range(MAX_ENDPOINTS)]
        application, instance_hash = phone.hashes("org.example.one-too-many")
        error_type, condition, text = await phone.register_error(
            f"<register xmlns='{NS_UP}' application='{application}' "
            f"instance='{instance_hash}'/>")
        assert (error_type, condition) == ("cancel", "not-allowed")
        assert "unified_push_max_endpoints" in text
        # Renewing one it has is not a new endpoint.
        assert (await registered(phone, "org.example.app0")).endpoint == endpoints[0].endpoint

    up.run(run)


# ------------------------------------------------------------------ HTTP


def test_posts_are_delivered_byte_exact_in_order(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        bodies = [b"hello", b"\0", b"\0\0\xff\0", bytes(range(256)),
                  secrets.token_bytes(4095) + b"\0", "é €".encode(), b"\r\n\r\n"]
        for body in bodies:
            answer = await posted(endpoint, body, {"TTL": "60",
                                                   "Content-Type": "application/octet-stream",
                                                   "Content-Encoding": "aes128gcm"})
            assert answer.header("TTL") == "60"
            location = answer.header("Location")
            assert location.startswith(endpoint + "/m/"), location
            assert answer.header("Access-Control-Allow-Origin") == "*"
        await phone.wait_pushes(len(bodies))
        await marker_once(phone, endpoint, bodies)
        assert {p.sender for p in phone.pushes} == {up.host}
        assert {p.to for p in phone.pushes} == {phone.boundjid.full}
        assert {(p.application, p.instance) for p in phone.pushes} \
            == {phone.hashes("org.example.app")}

    up.run(run)


def test_http_answers(up: Scenario) -> None:
    instance = up.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        host_part = endpoint.rsplit("/", 1)[1].split(".")[0]

        got = await request(endpoint, "GET")
        assert got.status == 200
        assert json.loads(got.body) == {"unifiedpush": {"version": 1}}
        assert got.header("Content-Type").startswith("application/json")
        assert got.header("Access-Control-Allow-Origin") == "*"

        options = await request(endpoint, "OPTIONS")
        assert options.status == 204
        assert options.header("Access-Control-Allow-Origin") == "*"
        assert {m.strip() for m in options.header("Access-Control-Allow-Methods").split(",")} \
            >= {"GET", "POST", "OPTIONS"}
        allowed = {h.strip().lower()
                   for h in options.header("Access-Control-Allow-Headers").split(",")}
        assert allowed >= {"content-type", "content-encoding", "ttl", "urgency", "topic"}

        put = await request(endpoint, "PUT", body=b"x")
        assert put.status == 405 and "POST" in put.header("Allow")

        # Unknown tokens: of this host, of another host, malformed, none; a message's
        # Location.
        unknown = f"{instance.up_url}/{host_part}.{b64url_nopad(secrets.token_bytes(32))}"
        elsewhere = (f"{instance.up_url}/{b64url_nopad(b'example.net')}."
                     f"{b64url_nopad(secrets.token_bytes(32))}")
        short_secret = f"{instance.up_url}/{host_part}.{b64url_nopad(bytes(31))}"
        not_base64url = f"{instance.up_url}/{host_part}.{'+' * 43}"
        for url in (unknown, elsewhere, short_secret, not_base64url,
                    f"{instance.up_url}/{host_part}", f"{instance.up_url}/nodot",
                    f"{instance.up_url}/!!!.!!!", f"{instance.up_url}/", instance.up_url):
            assert (await post(url, b"x")).status == 404, url
        # GET does not look the token up (as Prosody): well-formed for this host is enough.
        assert (await request(unknown, "GET")).status == 200
        assert (await request(elsewhere, "GET")).status == 404
        assert (await request(f"{instance.up_url}/nodot", "GET")).status == 404
        location = (await posted(endpoint, b"first")).header("Location")
        assert (await request(location, "GET")).status == 404
        assert (await post(location, b"x")).status == 404

        oversize = await post(endpoint, bytes(4097))
        assert oversize.status == 413
        assert oversize.header("Access-Control-Allow-Origin") == "*"
        assert (await post(endpoint, b"")).status == 400
        for headers in ({"TTL": "abc"}, {"TTL": "-1"}, {"TTL": "1.5"}, {"TTL": "12345678901"},
                        {"TTL": ""}, {"Urgency": "urgent"}, {"Urgency": "HIGH!"},
                        {"TTL": "\u00b2"}, {"TTL": "1\u00b9"},  # digits to str.isdigit()
                        {"Urgency": "h\u00efgh"}, {"Topic": "caf\u00e9"},
                        {"Topic": "has space"}, {"Topic": "a" * 33}, {"Topic": "a+b/c"}):
            answer = await post(endpoint, b"refused", headers)
            assert answer.status == 400, (headers, answer.status)

        # What is kept: the TTL asked for, at most unified_push_max_ttl; none asked: that.
        assert (await posted(endpoint, b"no ttl")).header("TTL") == str(DEFAULT_TTL)
        assert (await posted(endpoint, b"long ttl", {"TTL": "999999999"})).header("TTL") \
            == str(DEFAULT_TTL)
        assert (await posted(endpoint, bytes(4096), {
            "TTL": "0", "Urgency": "very-low", "Topic": "A-z_09" * 5 + "ab"})).header("TTL") \
            == "0"
        # The Host header does not matter (the token names the host)
        await posted(endpoint, b"hostile host", host="evil.example:443")

        await marker_once(phone, endpoint,
                          [b"first", b"no ttl", b"long ttl", bytes(4096), b"hostile host"])

    up.run(run)


def test_rate_limit_answers_429_with_retry_after(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        statuses = []
        limited = None
        for n in range(30):  # unified_push_burst (10), then 60 a minute
            answer = await post(endpoint, b"%d" % n)
            statuses.append(answer.status)
            if answer.status == 429:
                limited = answer
                break
        assert limited is not None, statuses
        assert statuses[:10] == [201] * 10 and set(statuses[:-1]) == {201}
        retry_after = limited.header("Retry-After")
        assert retry_after.isascii() and retry_after.isdigit() and 1 <= int(retry_after) <= 60
        accepted = [b"%d" % n for n in range(len(statuses) - 1)]
        await phone.wait_pushes(len(accepted))
        assert phone.payloads() == accepted  # the refused one was not pushed

    up.run(run)


# ------------------------------------------------------------------ nothing lost


def test_pending_session_keeps_pushes_until_resumed(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_pending(up.instance, phone)
        sent = [b"while pending %d" % n for n in range(3)]
        for body in sent:
            await posted(endpoint, body)
        assert phone.pushes == []
        await phone.resume()
        await phone.wait_pushes(len(sent))
        await marker_once(phone, endpoint, sent)

    up.run(run)


def test_ttl_0_is_tried_once(up: Scenario) -> None:
    """TTL 0: not kept for a pending session (dropped), the next push is."""
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_pending(up.instance, phone)
        assert (await posted(endpoint, b"now or never", {"TTL": "0"})).header("TTL") == "0"
        await posted(endpoint, b"keep me", {"TTL": "600"})
        await phone.resume()
        await phone.wait_pushes(1)
        await marker_once(phone, endpoint, [b"keep me"])

    up.run(run)


def test_session_gone_keeps_pushes_until_the_next_bind(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_offline(up.instance, phone)
        sent = [b"while away %d" % n for n in range(3)]
        for body in sent:
            await posted(endpoint, body)
        # Another client of the account binds (and sends its presence to the host): not
        # the registered full JID, it gets nothing.
        other = await distributor(peers, f"{phone.boundjid.bare}/Other", phone.password)
        # Conversations binds again (same resource) and sends its presence to the host.
        again = await distributor(peers, phone.boundjid.full, phone.password)
        await again.wait_pushes(len(sent))
        await marker_once(again, endpoint, sent)
        assert phone.pushes == [] and other.pushes == []

    up.run(run)


@pytest.mark.parametrize("condition", ["item-not-found", "feature-not-implemented"])
def test_item_not_found_revokes_the_endpoint(up: Scenario, condition: str) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        phone.refusal = condition
        gone = await registered(phone, "org.example.uninstalled")
        kept = await registered(phone, "org.example.kept")
        phone.refuse.add(phone.hashes("org.example.uninstalled"))
        await posted(gone.endpoint, b"one")
        await phone.wait_pushes(1)
        # The answer reaches Python after the client sent it: a POST crossing it may still
        # be taken (and refused by the client again), never more than a few.
        statuses = []
        while True:
            answer = await post(gone.endpoint, b"later")
            statuses.append(answer.status)
            if answer.status != 201:
                break
            assert len(statuses) < 5, statuses
            await phone.wait_pushes(len(statuses) + 1)
        assert answer.status == 404, statuses
        refused_app = phone.hashes("org.example.uninstalled")[0]
        assert len(phone.payloads(refused_app)) == len(statuses)  # "one" + the 201s
        # The other app is untouched; registering again gives a new endpoint that works.
        await posted(kept.endpoint, b"other app")
        await phone.wait_payload(b"other app")
        phone.refuse.clear()
        again = await registered(phone, "org.example.uninstalled")
        assert again.endpoint != gone.endpoint
        await posted(again.endpoint, b"reinstalled")
        await phone.wait_payload(b"reinstalled")
        assert (await post(gone.endpoint, b"x")).status == 404

    up.run(run)


def test_pushes_kept_for_a_gone_resource_go_to_the_one_that_registers_next(
        up: Scenario) -> None:
    """Conversations reinstalled (a new resource) registers the same app again: what the
    endpoint kept for the old resource goes to the new one at once, in order."""
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_offline(up.instance, phone)
        sent = [b"kept for the old one %d" % n for n in range(2)]
        for body in sent:
            await posted(endpoint, body)
        tablet = await distributor(peers, f"{phone.boundjid.bare}/Conversations.New",
                                   phone.password)
        tablet.account_uuid = phone.account_uuid
        assert (await registered(tablet)).endpoint == endpoint
        await tablet.wait_pushes(len(sent))
        await marker_once(tablet, endpoint, sent)
        assert phone.pushes == []

    up.run(run)


def test_a_removed_account_loses_its_endpoints(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_offline(up.instance, phone)
        await posted(endpoint, b"kept")
        await asyncio.to_thread(up.instance.ctl, "unregister", phone.boundjid.user, up.host)
        await asyncio.to_thread(
            wait_until, lambda: http_request(endpoint, "POST", b"x").status == 404,
            "the endpoint of a removed account still takes POSTs", TIMEOUT, 0.5)

    up.run(run)


def test_concurrent_posts_each_delivered_once(up: Scenario) -> None:
    """POSTs at the same time, to an online session and then to a pending one."""
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        online = [b"online %d" % n for n in range(6)]
        answers = await asyncio.gather(*(post(endpoint, body) for body in online))
        assert [a.status for a in answers] == [201] * len(online)
        await phone.wait_pushes(len(online))
        await go_pending(up.instance, phone)
        pending = [b"pending %d" % n for n in range(MAX_KEPT - 1)]
        answers = await asyncio.gather(*(post(endpoint, body) for body in pending))
        assert [a.status for a in answers] == [201] * len(pending)
        await phone.resume()
        await phone.wait_pushes(len(online) + len(pending))
        marker = await marker_once(phone, endpoint, phone.payloads())  # nothing more came
        assert Counter(phone.payloads()) == Counter([*online, *pending, marker])
        # Locations name each message differently
        assert len({a.header("Location") for a in answers}) == len(pending)

    up.run(run)


def test_topic_replaces_a_kept_push(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_pending(up.instance, phone)
        await posted(endpoint, b"old news", {"Topic": "news"})
        await posted(endpoint, b"other", {"Topic": "other"})
        await posted(endpoint, b"no topic")
        await posted(endpoint, b"new news", {"Topic": "news"})
        await phone.resume()
        await phone.wait_pushes(3)
        await marker_once(phone, endpoint, [b"other", b"no topic", b"new news"])

    up.run(run)


def test_at_most_max_kept_pushes_the_oldest_dropped(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_pending(up.instance, phone)
        sent = [b"kept %d" % n for n in range(MAX_KEPT + 2)]
        for body in sent:
            await posted(endpoint, body)
        await phone.resume()
        await phone.wait_pushes(MAX_KEPT)
        await marker_once(phone, endpoint, sent[-MAX_KEPT:])

    up.run(run)


def test_kept_pushes_wake_a_xep0357_user_once(up: Scenario) -> None:
    async def run(peers: Peers) -> None:
        jid, password = await asyncio.to_thread(up.account, "app")
        app_server = await peers.app_server(jid, password)
        jid, password = await asyncio.to_thread(up.account, "sender")
        sender = await peers.user(jid, password)
        phone = await up_user(up, peers)
        await phone.enable_push(app_server.boundjid.full, "fcm")
        endpoint = (await registered(phone)).endpoint
        await go_pending(up.instance, phone)
        sent = [b"wake %d" % n for n in range(3)]
        for body in sent:
            await posted(endpoint, body)
        (wake,) = await app_server.wait_for("fcm", 1)
        assert wake.sender == up.host
        await phone.resume()
        await phone.wait_pushes(len(sent))
        marker = await marker_once(phone, endpoint, sent)
        # Pending again: the resume cleared the mark, two more POSTs wake it once more; a
        # chat message then makes the next XEP-0357 push, and nothing came in between.
        await go_pending(up.instance, phone)
        for body in (b"again 1", b"again 2"):
            await posted(endpoint, body)
        await app_server.wait_for("fcm", 2)
        sender.send_message(mto=phone.boundjid.full, mbody="chat", mtype="chat")
        pushes = await app_server.wait_for("fcm", 3)
        assert len(pushes) == 3
        await phone.resume()
        await phone.wait_pushes(len(sent) + 3)
        await marker_once(phone, endpoint, [*sent, marker, b"again 1", b"again 2"])

    up.run(run)


# ------------------------------------------------------------------ operator


def test_operator_lists_and_revokes_endpoints(up: Scenario) -> None:
    instance = up.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        user = phone.boundjid.user
        apps = [("org.example.one", "c1"), ("org.example.two", "c2"),
                ("org.example.three", "c3")]
        endpoints = [await registered(phone, app, connector) for app, connector in apps]
        hashes = [phone.hashes(app, connector) for app, connector in apps]
        listed = await asyncio.to_thread(instance.ctl, "push_up_list", user, up.host)
        for registration, (application, instance_hash) in zip(endpoints, hashes, strict=True):
            assert short_hash(application) in listed and short_hash(instance_hash) in listed, \
                listed
            secret = registration.token.split(".")[1]
            assert secret not in listed and registration.endpoint not in listed
            assert application not in listed and instance_hash not in listed
        assert phone.boundjid.resource in listed

        # One, by the id the list shows (its instance's hash)
        await asyncio.to_thread(instance.ctl, "push_up_revoke", user, up.host,
                                short_hash(hashes[0][1]))
        assert (await post(endpoints[0].endpoint, b"x")).status == 404
        await posted(endpoints[1].endpoint, b"still there")
        await phone.wait_payload(b"still there")
        unknown = await asyncio.to_thread(instance.ctl, "push_up_revoke", user, up.host,
                                          "0badc0de", check=False)
        assert "no such UnifiedPush endpoint" in unknown, unknown
        # All
        await asyncio.to_thread(instance.ctl, "push_up_revoke", user, up.host, "all")
        for registration in endpoints:
            assert (await post(registration.endpoint, b"x")).status == 404
        listed = await asyncio.to_thread(instance.ctl, "push_up_list", user, up.host)
        assert all(short_hash(h) not in listed for pair in hashes for h in pair), listed
        assert phone.payloads() == [b"still there"]

    up.run(run)


def unifiedpush_metrics(instance: Instance) -> Counter[str]:
    """pymod_push_unifiedpush_* of the metrics endpoint, by name and labels (host left
    out): 'posts_total{code=201}' -> value."""
    with urllib.request.urlopen(f"http://{instance.options['metrics_listen']}/metrics",
                                timeout=10) as response:
        text = response.read().decode()
    found: Counter[str] = Counter()
    for name, labels, value in re.findall(
            r"^pymod_push_unifiedpush_(\w+)\{([^}]*)\} (\S+)$", text, re.M):
        kept = ",".join(f"{k}={v}" for k, v in re.findall(r'(\w+)="([^"]*)"', labels)
                        if k != "host")
        found[f"{name}{{{kept}}}" if kept else name] = float(value)
    return found


def test_metrics_and_push_status_count_it(up: Scenario) -> None:
    instance = up.instance

    async def run(peers: Peers) -> None:
        before = await asyncio.to_thread(unifiedpush_metrics, instance)
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        for body in (b"one", b"two"):
            await posted(endpoint, body)
        await phone.wait_pushes(2)
        assert (await post(endpoint, b"x", {"TTL": "soon"})).status == 400
        host_part = endpoint.rsplit("/", 1)[1].split(".")[0]
        unknown = f"{instance.up_url}/{host_part}.{b64url_nopad(secrets.token_bytes(32))}"
        assert (await post(unknown, b"x")).status == 404
        await go_pending(instance, phone)
        await posted(endpoint, b"first", {"Topic": "t"})
        await posted(endpoint, b"second", {"Topic": "t"})  # replaces the first

        def delta() -> Counter[str]:
            now = unifiedpush_metrics(instance)
            return Counter({k: now[k] - before[k] for k in now if now[k] != before[k]})

        expected = {"endpoints": 1, "posts_total{code=201}": 4, "posts_total{code=400}": 1,
                    "posts_total{code=404}": 1, "deliveries_total": 2, "kept": 1,
                    "dropped_total{reason=topic}": 1}
        await asyncio.to_thread(wait_until, lambda: delta() == expected,
                                "metrics did not count it")
        status = await asyncio.to_thread(instance.ctl, "push_status", instance.host)
        assert "UnifiedPush" in status, status
        await phone.resume()
        await phone.wait_pushes(3)
        await marker_once(phone, endpoint, [b"one", b"two", b"second"])
        expected.update({"posts_total{code=201}": 5, "deliveries_total": 4})
        del expected["kept"]
        await asyncio.to_thread(wait_until, lambda: delta() == expected,
                                "metrics did not count the deliveries")

    up.run(run)


# ------------------------------------------------------------------ crashes and restarts


def kill_python(instance: Instance) -> None:
    """SIGKILL the port program; wait until the shim has started the next one."""
    pid = instance.python_pid()
    assert pid is not None
    mark = instance.log_mark()
    os.kill(pid, signal.SIGKILL)
    instance.wait_for_log(r"Python process exited with status", mark)
    instance.wait_ready(mark)


def shim_knows_pending(instance: Instance, full_jid: str) -> bool:
    """The shim has noted that session as a pending UnifiedPush user's (a push for it is
    then kept, not queued in the session)."""
    user, rest = full_jid.split("@", 1)
    host, resource = rest.split("/", 1)
    return instance.erl(
        f'P = ejabberd_sm:get_session_pid(<<"{user}">>, <<"{host}">>, <<"{resource}">>), '
        f'ets:member(mod_push_py_up:pending_table(<<"{host}">>), P)') == "true"


@pytest.mark.parametrize("while_", ["held", "pending", "pending after"])
def test_sigkill_of_python_after_201_delivers_once(chaos: Scenario, while_: str) -> None:
    """held: the client has the push and holds its answer across the kill; pending: the
    session is pending (the push kept) across the kill, then resumes; pending after: the
    session goes pending after the restart (the new process told the shim again who the
    UnifiedPush users are), then the POST."""
    instance = chaos.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(chaos, peers)
        endpoint = (await registered(phone)).endpoint
        if while_ == "pending after":
            await asyncio.to_thread(kill_python, instance)
            await go_pending(instance, phone)
            assert await asyncio.to_thread(shim_knows_pending, instance, phone.boundjid.full)
            await posted(endpoint, b"after the kill")
            await phone.resume()
            await phone.wait_payload(b"after the kill")
            await marker_once(phone, endpoint, [b"after the kill"])
            return
        if while_ == "held":
            phone.hold = True
        else:
            await go_pending(instance, phone)
        await posted(endpoint, b"across the kill")
        if while_ == "held":
            await phone.wait_pushes(1)
        await asyncio.to_thread(kill_python, instance)
        if while_ == "held":
            phone.release()
        else:
            await phone.resume()
        await phone.wait_payload(b"across the kill")
        await marker_once(phone, endpoint, [b"across the kill"])

    chaos.run(run)


def test_a_post_python_does_not_answer_in_10_s_gets_503_and_is_not_kept(
        chaos: Scenario) -> None:
    """Python stopped (SIGSTOP) past the POST's 10 s: 503 with Retry-After; Python, back,
    finds the deadline passed and keeps nothing (the app server's retry is the copy)."""
    instance = chaos.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(chaos, peers)
        endpoint = (await registered(phone)).endpoint
        pid = instance.python_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            answer = await post(endpoint, b"too slow")
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the shim replaced it meanwhile
        assert answer.status == 503, answer
        assert answer.header("Retry-After").isdigit()
        await marker_once(phone, endpoint, [])

    chaos.run(run)


def test_sigkill_of_python_while_a_post_waits_answers_it_once(chaos: Scenario) -> None:
    """The POST's event is in the shim's durable queue when Python dies: the next process
    gets it replayed and answers the waiting request 201; delivered once."""
    instance = chaos.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(chaos, peers)
        endpoint = (await registered(phone)).endpoint
        pid = instance.python_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it takes the event and never answers
        waiting = asyncio.ensure_future(post(endpoint, b"replayed"))
        await asyncio.to_thread(wait_until, lambda: http_waiting(instance) >= 1,
                                "the POST is not waiting for Python")
        mark = instance.log_mark()
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(instance.wait_ready, mark)
        answer = await waiting
        assert answer.status == 201, answer
        await phone.wait_payload(b"replayed")
        await marker_once(phone, endpoint, [b"replayed"])

    chaos.run(run)


def test_an_ejabberd_restart_keeps_a_kept_push(chaos: Scenario) -> None:
    instance = chaos.instance
    phone_jid = password = endpoint = ""

    async def before(peers: Peers) -> None:
        nonlocal phone_jid, password, endpoint
        phone = await up_user(chaos, peers)
        phone_jid, password = phone.boundjid.full, phone.password
        endpoint = (await registered(phone)).endpoint
        await go_pending(instance, phone)
        await posted(endpoint, b"across the restart")

    chaos.run(before)
    instance.stop()
    mark = instance.log_mark()
    instance.start(install=False)
    instance.wait_ready(mark)

    async def after(peers: Peers) -> None:
        phone = await distributor(peers, phone_jid, password)  # the session is gone: a bind
        await phone.wait_payload(b"across the restart")
        marker = await marker_once(phone, endpoint, [b"across the restart"])
        # The restarted shim knows the UnifiedPush users again: pending, the push is kept.
        await go_pending(instance, phone)
        assert await asyncio.to_thread(shim_knows_pending, instance, phone.boundjid.full)
        await posted(endpoint, b"after the restart")
        await phone.resume()
        await phone.wait_payload(b"after the restart")
        await marker_once(phone, endpoint, [b"across the restart", marker,
                                            b"after the restart"])

    chaos.run(after)


def test_pushes_queued_in_sessions_that_went_pending(chaos: Scenario) -> None:
    """The <push/> went to a live session that had stopped reading, which then lost its
    connection: the shim's timeout (30 s) finds the session pending, the IQ waiting in its
    stream-management queue. One session resumes: ejabberd resends it (counted delivered,
    not sent again); the other binds again instead: the old session bounced it, it is sent
    again. Each gets it once. (Both at once: the timeout is waited for once.)"""
    instance = chaos.instance

    async def queued(peers: Peers) -> tuple[Distributor, str, float]:
        phone = await up_user(chaos, peers)
        endpoint = (await registered(phone)).endpoint
        await phone.acknowledge()
        full = phone.boundjid.full
        assert phone.transport is not None
        phone.transport.pause_reading()
        posted_at = time.monotonic()
        await posted(endpoint, b"queued")
        await asyncio.to_thread(wait_until, lambda: unacked(instance, full) >= 1,
                                "the <push/> did not reach the session")
        phone.drop()
        await asyncio.to_thread(wait_until, lambda: session_state(instance, full) == "pending",
                                f"{full} did not become pending")
        return phone, endpoint, posted_at

    async def run(peers: Peers) -> None:
        resuming, resuming_endpoint, _ = await queued(peers)
        binding, binding_endpoint, last = await queued(peers)
        # The shim's route_iq timeout (TimeoutMs 30000) passes while they are pending.
        await asyncio.to_thread(wait_until, lambda: time.monotonic() > last + 33, "", 40, 0.5)
        await resuming.resume()
        again = await distributor(peers, binding.boundjid.full, binding.password)
        for receiver, endpoint in ((resuming, resuming_endpoint), (again, binding_endpoint)):
            await receiver.wait_payload(b"queued")
            await marker_once(receiver, endpoint, [b"queued"])
        assert binding.pushes == []  # it never read it

    chaos.run(run)


@pytest.fixture(scope="module")
def ejabberd_up_short() -> Iterator[Instance]:
    """Endpoints expire after 3 s, pushes are kept at most 5 s."""
    yield from _up_instance({**UP_OPTIONS, "unified_push_expiration": 3,
                             "unified_push_max_ttl": 5}, "pymod_push-upshort-")


@pytest.fixture
def short(ejabberd_up_short: Instance) -> Scenario:
    return Scenario(ejabberd_up_short)


def after(moment: datetime, seconds: float) -> None:
    """Until the wall clock is past that moment plus seconds (expirations are wall-clock)."""
    wait_until(lambda: datetime.now(UTC) > moment + timedelta(seconds=seconds),
               f"{moment} + {seconds} s", 60, 0.1)


@pytest.mark.parametrize(("option", "bad", "named"), [
    ("unified_push_expiration", "5270400", "unified_push_expiration"),  # 61 days
    ("unified_push_url", '"http://127.0.0.1/up?x=1"', "unified_push_url"),
    ("unified_push_url", '"ftp://127.0.0.1/up"', "unified_push_url")])
def test_bad_unified_push_options_are_refused(ejabberd_up_short: Instance, option: str,
                                              bad: str, named: str) -> None:
    """An expiration over 60 days, a URL with a query or not http(s): the configuration
    does not load, and the error names the option."""
    conf = ejabberd_up_short.folder / "modules" / "mod_push_py" / "conf" / "mod_push_py.yml"
    original = conf.read_text()
    broken, count = re.subn(rf"^(\s*){option}: .*$", rf"\g<1>{option}: {bad}", original,
                            flags=re.M)
    if count == 0:  # not in the conf file yet: added beside the others
        broken, count = re.subn(r"^(\s*)unified_push_expiration: .*$",
                                rf"\g<0>\n\g<1>{option}: {bad}", original, flags=re.M)
    assert count == 1, original
    try:
        conf.write_text(broken)
        mark = ejabberd_up_short.log_mark()
        ejabberd_up_short.ctl("reload_config", check=False)
        line = ejabberd_up_short.wait_for_log(r"Configuration reload aborted|Invalid value",
                                              mark)
        assert named in line, line
    finally:
        conf.write_text(original)
        ejabberd_up_short.ctl("reload_config")


def test_an_expired_endpoint_answers_404_until_renewed(short: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(short, peers)
        first = await registered(phone)
        now = datetime.now(UTC)
        assert now + timedelta(seconds=1) <= first.expires + timedelta(seconds=1)
        assert first.expires <= now + timedelta(seconds=4)
        await posted(first.endpoint, b"in time")
        await phone.wait_payload(b"in time")
        await asyncio.to_thread(after, first.expires, 1.5)
        assert (await post(first.endpoint, b"too late")).status == 404
        renewed = await registered(phone)
        await posted(renewed.endpoint, b"renewed")
        await phone.wait_payload(b"renewed")
        assert phone.payloads() == [b"in time", b"renewed"]

    short.run(run)


def test_a_kept_push_is_dropped_when_its_ttl_ends(up: Scenario) -> None:
    """On the main instance: the short one's endpoints expire before this test ends."""
    async def run(peers: Peers) -> None:
        phone = await up_user(up, peers)
        endpoint = (await registered(phone)).endpoint
        await go_pending(up.instance, phone)
        assert (await posted(endpoint, b"short-lived", {"TTL": "1"})).header("TTL") == "1"
        accepted = datetime.now(UTC)
        await asyncio.to_thread(after, accepted, 2)
        assert (await posted(endpoint, b"fresh", {"TTL": "60"})).header("TTL") == "60"
        await phone.resume()
        await phone.wait_payload(b"fresh")
        await marker_once(phone, endpoint, [b"fresh"])

    up.run(run)


def test_a_ttl_over_the_maximum_is_capped(short: Scenario) -> None:
    async def run(peers: Peers) -> None:
        phone = await up_user(short, peers)
        endpoint = (await registered(phone)).endpoint
        # unified_push_max_ttl: 5 s on this instance
        assert (await posted(endpoint, b"capped", {"TTL": "60"})).header("TTL") == "5"
        await phone.wait_payload(b"capped")

    short.run(run)


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="module")
def ejabberd_up_postgres(postgres: Any) -> Iterator[Instance]:
    """The state in PostgreSQL (db_url), for the database outage."""
    yield from _up_instance({**UP_OPTIONS, "db_url": postgres.new_database()},
                            "pymod_push-uppg-")


@pytest.mark.parametrize("session", ["online", "pending"])
def test_a_database_outage_loses_no_accepted_push_and_sends_none_twice(
        ejabberd_up_postgres: Instance, postgres: Any, session: str) -> None:
    """PostgreSQL stopped for 4 s while POSTs wait (one at the start of the outage, one
    in its middle): each is answered 201, and then delivered exactly once, or 503 (not
    stored in time: not delivered, the app server retries), never anything else; once
    the database is back, POSTs are taken again (as messages are: "database back after")."""
    scenario = Scenario(ejabberd_up_postgres)
    instance = scenario.instance

    async def run(peers: Peers) -> None:
        phone = await up_user(scenario, peers)
        endpoint = (await registered(phone)).endpoint
        await posted(endpoint, b"before")
        await phone.wait_payload(b"before")
        if session == "pending":
            await go_pending(instance, phone)
        await asyncio.to_thread(postgres.halt)
        try:
            down = time.monotonic()
            first = asyncio.ensure_future(post(endpoint, b"during 1"))
            await asyncio.to_thread(wait_until, lambda: http_waiting(instance) >= 1,
                                    "the POST is not waiting for Python")
            await asyncio.to_thread(wait_until, lambda: time.monotonic() > down + 2, "", 10)
            second = asyncio.ensure_future(post(endpoint, b"during 2"))
            await asyncio.to_thread(wait_until, lambda: time.monotonic() > down + 4, "", 10)
        finally:
            await asyncio.to_thread(postgres.start)
        back = time.monotonic()
        answers = {b"during 1": await first, b"during 2": await second}
        assert {a.status for a in answers.values()} <= {201, 503}, answers
        accepted = [body for body, answer in answers.items() if answer.status == 201]
        # The database is back: POSTs are taken again within its reconnection delay.
        marker = b"after the outage"
        while (answer := await post(endpoint, marker)).status == 503:
            assert time.monotonic() < back + 20, "still 503 20 s after the database is back"
        assert answer.status == 201, answer
        if session == "pending":
            await phone.resume()
        await phone.wait_payload(marker)
        assert phone.payloads() == [b"before", *accepted, marker]

    scenario.run(run)


# ------------------------------------------------------------------ two virtual hosts

OTHER = "other.localhost"


@pytest.fixture(scope="module")
def ejabberd_up_two_hosts() -> Iterator[Instance]:
    yield from _up_instance(UP_OPTIONS, "pymod_push-up2-", (OTHER,))


@pytest.mark.parametrize("user_host", [OTHER, "localhost"])
def test_the_push_server_is_the_host_registered_at(ejabberd_up_two_hosts: Instance,
                                                   user_host: str) -> None:
    """Users of either virtual host register at other.localhost (Conversations' "Push
    Server" setting): the token names other.localhost, pushes come from it, and are kept
    for a pending session (delivered once on its resume) or a gone one (delivered once
    after the next bind's presence to other.localhost)."""
    instance = ejabberd_up_two_hosts
    scenario = Scenario(instance)

    async def run(peers: Peers) -> None:
        name = f"two{secrets.token_hex(4)}"
        await asyncio.to_thread(instance.register, name, user_host, "pw")
        full = f"{name}@{user_host}/Conversations.x"
        phone = await distributor(peers, full, "pw", push_server=OTHER)
        registration = await phone.register_up(*phone.hashes("org.example.app"))
        host_part = registration.token.split(".")[0]
        assert b64url_decode(host_part) == OTHER.encode()
        await posted(registration.endpoint, b"online")
        await phone.wait_payload(b"online")
        assert phone.pushes[0].sender == OTHER
        await go_pending(instance, phone)
        await posted(registration.endpoint, b"while pending")
        await phone.resume()
        await phone.wait_payload(b"while pending")
        await marker_once(phone, registration.endpoint, [b"online", b"while pending"])
        assert {p.sender for p in phone.pushes} == {OTHER}
        # Gone, then a new bind: its presence to other.localhost brings what was kept.
        await go_offline(instance, phone)
        await posted(registration.endpoint, b"while away")
        again = await distributor(peers, full, "pw", push_server=OTHER)
        await again.wait_payload(b"while away")
        await marker_once(again, registration.endpoint, [b"while away"])
        assert {p.sender for p in again.pushes} == {OTHER}

    scenario.run(run)
