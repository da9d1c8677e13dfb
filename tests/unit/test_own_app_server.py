"""Publishes to the module's own app server taken in-process (issue 15): what the app server
reads from them, and what the publisher makes of its answers, is what the IQ path gives,
checked against that path driven the way ejabberd drives it (the publish IQ as the shim
builds it, the app server's answer back as an iq_reply)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymod_push.appserver import requests as app
from pymod_push.appserver.server import (
    PUBLISH_BURST,
    Delivery,
    publish_answer,
    publish_error_reply,
    publish_reply,
)
from pymod_push.core.config import Backend, Config
from pymod_push.core.xmpp import RequestError
from pymod_push.protocol import (
    Action,
    AppServerIq,
    Publish,
    PublishReply,
    PushIq,
    Route,
    SessionPending,
    SetPush,
    Stanza,
    StanzaToPending,
)
from pymod_push.providers import DeliveryOutcome
from pymod_push.records import DatabaseUnavailable
from pymod_push.service.decisions import PushService
from pymod_push.service.ledger import OWN_RETRY_S
from pymod_push.store import Store
from tests.builders import (
    HOST,
    NOW,
    NS_DATA,
    NS_STANZAS,
    OWN_HOST_BACKENDS,
    PHONE,
    PUBSUB_HOST,
    publish_iq_xml,
    registered,
)

# ------------------------------------------------------------------ what is read
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=40) | st.sampled_from(["a\r\nb", "\r", "x" * 5000, ""])
fields = st.lists(st.tuples(text, st.lists(text, max_size=3).map(tuple)), max_size=70)


def xml_safe(value: str) -> bool:
    return all(c in "\t\n\r" or (c >= " " and c not in "\ufffe\uffff") for c in value)


@settings(max_examples=300, deadline=None)
@given(summary=fields, options=st.none() | fields, node=text.filter(bool))
def test_the_app_server_reads_the_same_from_a_publish_taken_in_process(
        summary: list[tuple[str, tuple[str, ...]]], options: Any, node: str) -> None:
    everything = [node, *(v for var, values in (summary + (options or []))
                          for v in (var, *values))]
    if not all(xml_safe(v) for v in everything):
        return  # not in a stanza ejabberd accepted
    publish = Publish(1, PUBSUB_HOST, node, tuple(summary), tuple(options) if options else None, 30)
    routed = app.parse_publish(app.parse_iq(publish_iq_xml(publish)))
    assert app.direct_publish(node, publish.fields, publish.publish_options) == routed


# ------------------------------------------------------------------ what is answered
def enable(service: PushService, node: str, secret: str) -> None:
    options = (f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
               "http://jabber.org/protocol/pubsub#publish-options</value></field><field "
               f"var='secret'><value>{secret}</value></field></x>")
    xml = f"<enable xmlns='urn:xmpp:push:0' jid='{PUBSUB_HOST}' node='{node}'>{options}</enable>"
    service.handle(PushIq("e", PHONE, (PHONE[0], HOST, ""), "set", "en", xml.encode()), NOW)
    service.handle(SessionPending(PHONE, ()), NOW)


def message(n: int) -> StanzaToPending:
    return StanzaToPending(PHONE, Stanza("message", "bob@example.org/pc", f"m{n}", "chat",
                                         f"hello {n}", b"<message/>"))


def reply_of(ref: int, xml: str) -> PublishReply:
    """The app server's answer as the shim reports it (iq_reply)."""
    element = ET.fromstring(xml)
    if element.get("type") == "result":
        return PublishReply(ref, "result")
    error = element.find("error")
    assert error is not None
    condition = next(c.tag.rpartition("}")[2] for c in error if c.tag != f"{{{NS_STANZAS}}}text")
    return PublishReply(ref, "error", error.get("type", ""), condition)


def through_ejabberd(service: PushService, actions: Sequence[Action | Delivery],
                     refs: dict[int, int]) -> list[Action | Delivery]:
    """The IQ path: a publish goes to the app server as the shim builds it, the app
    server's answer comes back (a Delivery is answered once its provider is: refs keeps
    the publish ref of each, by id)."""
    out: list[Action | Delivery] = []
    for action in actions:
        if not isinstance(action, Publish):
            out.append(action)
            continue
        for result in service.handle(AppServerIq(True, publish_iq_xml(action)), NOW):
            if isinstance(result, Route):
                out += service.handle(reply_of(action.ref, result.xml), NOW)
            else:
                assert isinstance(result, Delivery)
                refs[id(result)] = action.ref
                out.append(result)
    return out


def state(service: PushService, results: Sequence[Action | Delivery]) -> dict[str, Any]:
    """What a run leaves, refs aside (each service makes its own)."""
    registration = service.store.for_session(PHONE)
    return {
        "deliveries": [(d.backend.index, d.device.node, d.summary) for d in results
                       if isinstance(d, Delivery)],
        "set_push": [a for a in results if isinstance(a, SetPush)],
        "publishes": [a for a in results if isinstance(a, Publish)],
        "counters": dict(service.counters),
        "registrations": [(r.node, r.errors, r.last_error_at) for r in registration],
        "outbox": sorted((e.attempt, e.due, tuple(e.summary))
                         for e in service.store.outbox(service.config.ejabberd_node)),
        "retries": sorted((due, e.attempt) for due, _, e in service.ledger._retries),
    }


def twins() -> tuple[PushService, PushService]:
    """A service that takes its own publishes in-process and one that routes them (as
    it does another server's), each with its own store, the same device registered."""
    config = Config(HOST, backends=OWN_HOST_BACKENDS)
    direct = PushService(config, Store(":memory:"))
    routed = PushService(replace(config), Store(":memory:"))
    routed._own_pubsub = frozenset()
    return direct, routed


@pytest.mark.parametrize("case", ["good secret", "wrong secret", "unknown node",
                                  "over the device's rate", "gone at the provider",
                                  "refused by the provider"])
def test_a_publish_taken_in_process_is_answered_as_through_ejabberd(case: str) -> None:
    direct, routed = twins()
    refs: dict[int, int] = {}
    count = PUBLISH_BURST + 2 if case == "over the device's rate" else 1
    # What the provider says comes back to the publisher as the app server's answer.
    outcome = {"gone at the provider": DeliveryOutcome.UNREGISTERED,
               "refused by the provider": DeliveryOutcome.FAILED}.get(
                   case, DeliveryOutcome.DELIVERED)
    runs = []
    for service in (direct, routed):
        node, _ = registered(service)
        device = service.store.device(node)
        assert device is not None
        service.store.remove_device(node)  # the same node and secret in both stores
        service.store.add_device(replace(device, node="n1", secret="s1"))
        enable(service, "nobody" if case == "unknown node" else "n1",
               "not it" if case == "wrong secret" else "s1")
        results: list[Action | Delivery] = []
        for n in range(count):
            actions = service.handle(message(n), NOW)
            results += actions if service is direct else through_ejabberd(service, actions,
                                                                          refs)
        for delivery in [r for r in results if isinstance(r, Delivery)]:
            if delivery.ref is not None:
                reply = publish_reply(delivery.ref, outcome)
            else:
                reply = reply_of(refs[id(delivery)], publish_answer(delivery, outcome))
            results += service.handle(reply, NOW)
        runs.append(state(service, results))
    assert runs[0] == runs[1]
    assert direct.in_process == count and routed.in_process == 0


def test_a_refusal_in_process_is_the_iq_paths_error() -> None:
    reply = publish_error_reply(7, RequestError("resource-constraint", "slow down", "wait"))
    assert reply == PublishReply(7, "error", "wait", "resource-constraint")


def test_publishes_to_other_hosts_and_the_host_itself_are_routed() -> None:
    backends = (*OWN_HOST_BACKENDS, Backend(1, "apns", "other", HOST, HOST, {"topic": "x"}))
    service = PushService(Config(HOST, backends=backends), Store(":memory:"))
    for to in ("app.example.net", HOST, f"user@{PUBSUB_HOST}", "Pubsub.example.org"):
        publish = Publish(1, to, "n", (), None, 30)
        assert service.own_publishes([publish], NOW) == [publish]
    assert service.in_process == 0


def test_a_device_read_that_fails_leaves_the_publish_for_a_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database does not answer the app server's device read (PostgreSQL away): what
    the event did stands (its outbox entry is committed with it), the publish is not lost
    and not counted as an error, and goes again OWN_RETRY_S later."""
    service, _ = twins()
    node, secret = registered(service)
    enable(service, node, secret)
    read = service.store.device

    def away(node: str) -> Any:
        raise DatabaseUnavailable("test: the database is away")
    monkeypatch.setattr(service.store, "device", away)
    assert service.handle(message(1), NOW) == []
    (entry,) = service.store.outbox(service.config.ejabberd_node)
    assert service.counters["published"] == 1 and service.in_process == 0
    monkeypatch.setattr(service.store, "device", read)
    assert service.tick(NOW + OWN_RETRY_S / 2) == []
    (delivery,) = service.tick(NOW + OWN_RETRY_S)
    assert isinstance(delivery, Delivery) and delivery.summary["message-count"] == "1"
    assert service.store.get(service.store.for_session(PHONE)[0].key).errors == 0  # type: ignore[union-attr]
    service.handle(publish_reply(delivery.ref or 0, DeliveryOutcome.DELIVERED), NOW + 2)
    assert service.store.outbox(service.config.ejabberd_node) == []
    assert entry.id and service.in_process == 1
