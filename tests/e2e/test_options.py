"""Per-user push options end to end: the disco#info form, enable with an options form,
no escalation from a second resource, and what the pushes then contain."""

from __future__ import annotations

import pytest

from tests.conftest import Scenario
from tests.xmpp_peers import NS_DATA, NS_PUSH, Peers, form_fields

pytestmark = pytest.mark.e2e

DEFAULTS = {"FORM_TYPE": ["urn:xmpp:push:options"], "include-senders": ["0"],
            "include-message-count": ["1"], "include-subscription-count": ["1"],
            "include-message-bodies": ["0"]}


def test_disco_shows_the_server_defaults(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        _, phone, _ = await scenario.cast(peers)
        assert await phone.push_options() == DEFAULTS
        info = await phone.plugin["xep_0030"].get_info(jid=phone.boundjid.bare)
        assert ("account", "registered", None, None) in info["disco_info"]["identities"]
        assert NS_PUSH in info["disco_info"]["features"]

    scenario.run(run)


def test_first_enable_sets_options_and_pushes_follow_them(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, sender = await scenario.cast(peers)
        result = await phone.enable_push(server.boundjid.full, "opts", options={
            "include-senders": "1", "include-message-bodies": "1",
            "include-message-count": "0", "some-unknown-option": "whatever"})
        accepted = form_fields(result.xml.find(f"{{{NS_DATA}}}x"))
        expected = {**DEFAULTS, "include-senders": ["1"], "include-message-bodies": ["1"],
                    "include-message-count": ["0"]}
        assert accepted == expected
        assert await phone.push_options() == expected  # per user, kept
        await scenario.go_pending(phone)
        sender.send_message(mto=phone.boundjid.full, mbody="the body", mtype="chat")
        (push,) = await server.wait_for("opts", 1)
        assert push.summary["last-message-body"] == "the body"
        assert push.summary["last-message-sender"].startswith(sender.boundjid.bare)
        assert "message-count" not in push.summary

    scenario.run(run)


def test_a_second_resource_cannot_raise_an_option(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        await phone.enable_push(server.boundjid.full, "first",
                                options={"include-message-bodies": "0"})
        tablet = await peers.user(phone.boundjid.bare, "secret-" + phone.boundjid.user)
        result = await tablet.enable_push(server.boundjid.full, "second", options={
            "include-message-bodies": "1", "include-subscription-count": "0"})
        accepted = form_fields(result.xml.find(f"{{{NS_DATA}}}x"))
        assert accepted["include-message-bodies"] == ["0"]  # not raised
        assert accepted["include-subscription-count"] == ["0"]  # turning off is fine
        assert await tablet.push_options() == accepted

    scenario.run(run)


def test_malformed_options_form_is_a_bad_request(scenario: Scenario) -> None:
    async def run(peers: Peers) -> None:
        server, phone, _ = await scenario.cast(peers)
        enable = (f"<enable xmlns='{NS_PUSH}' jid='{server.boundjid.full}' node='n'>"
                  f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>"
                  "urn:xmpp:push:options</value></field><field var='include-senders'>"
                  "<value>perhaps</value></field></x></enable>")
        assert await phone.push_iq_error(enable) == ("modify", "bad-request")
        assert await phone.push_options() == DEFAULTS  # nothing changed

    scenario.run(run)
