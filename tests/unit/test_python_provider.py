"""Providers written in Python (pymod_push/python_provider.py): what a module must define,
what a registration keeps, what send's answers mean, reloading all or none, and delivery
through the dispatcher with its retries (end to end: tests/e2e/test_python_provider.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pymod_push.appserver.requests import Iq
from pymod_push.appserver.server import AppServer, Delivery
from pymod_push.core.config import Backend, Config, default_name
from pymod_push.core.xmpp import RequestError
from pymod_push.delivery.dispatcher import Dispatcher
from pymod_push.protocol import Route
from pymod_push.providers import DeliveryOutcome
from pymod_push.python_provider import (
    Delivered,
    Gone,
    ProviderError,
    PushDevice,
    PythonProviders,
    Refused,
    RetryLater,
    load_provider,
    reply_of,
)
from pymod_push.records import RegisteredDevice
from pymod_push.store import Store

GOOD = '''
from pymod_push.python_provider import RetryLater, Gone
FIELDS = {"phone": "Phone number", "note": "Anything"}
OPTIONAL_FIELDS = ("note",)
SENT = []
ANSWERS = []

def check_registration(fields):
    if not fields["phone"].startswith("+"):
        raise ValueError("the phone number must start with +")
    return {**fields, "phone": fields["phone"].replace(" ", "")}

async def send(device, notification, options):
    SENT.append((device, notification, dict(options)))
    return ANSWERS.pop(0) if ANSWERS else None
'''


def backend(tmp_path: Path, source: str, index: int = 0, **options: object) -> Backend:
    module = tmp_path / f"provider_{index}.py"
    module.write_text(source)
    return Backend(index, "python", "any", "localhost", "pubsub.localhost",
                   {"module": str(module), "name": default_name(str(module)), **options})


@pytest.mark.parametrize(("source", "reason"), [
    ("def send(:\n", "does not import (SyntaxError"),
    ("raise SystemExit(1)\n", "does not import (SystemExit"),
    ("FIELDS = ()\n", "has no 'async def send"),
    ("def send(device, notification):\n    pass\n", "has no 'async def send"),
    ("async def send(device):\n    pass\n", "send takes (device, notification)"),
    ("FIELDS = {'Phone': ''}\nasync def send(d, n):\n    pass\n", "unusable name 'Phone'"),
    ("FIELDS = ('device-id',)\nasync def send(d, n):\n    pass\n", "unusable name 'device-id'"),
    ("FIELDS = [f'f{i}' for i in range(17)]\nasync def send(d, n):\n    pass\n",
     "at most 16 names"),
    ("check_registration = 3\nasync def send(d, n):\n    pass\n", "not a function"),
])
def test_a_module_that_cannot_serve_is_refused_saying_why(tmp_path: Path, source: str,
                                                          reason: str) -> None:
    with pytest.raises(ProviderError, match=None) as caught:
        load_provider(backend(tmp_path, source))
    assert reason in str(caught.value)


def test_a_timeout_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="'timeout' is not a number"):
        load_provider(backend(tmp_path, GOOD, timeout="soon"))


def test_registration_keeps_the_declared_fields_as_the_module_checked_them(
        tmp_path: Path) -> None:
    provider = load_provider(backend(tmp_path, GOOD))
    assert provider.fields == {"phone": "Phone number", "note": "Anything"}
    assert provider.registration({"phone": "+33 6 12", "other": "x"}) == {
        "phone": "+33612", "note": ""}
    for given, condition, text in [({"note": "n"}, "bad-request", "field 'phone' is required"),
                                   ({"phone": "06"}, "bad-request",
                                    "the phone number must start with +")]:
        with pytest.raises(RequestError) as caught:
            provider.registration(given)
        assert (caught.value.condition, caught.value.text) == (condition, text)


@pytest.mark.parametrize("check", ["raise KeyError('secret-value')", "return 3"])
def test_a_registration_check_that_breaks_is_a_wait_error_and_logs_no_values(
        tmp_path: Path, check: str, caplog: pytest.LogCaptureFixture) -> None:
    source = f"FIELDS = ('phone',)\ndef check_registration(f):\n    {check}\n" \
             "async def send(d, n):\n    pass\n"
    provider = load_provider(backend(tmp_path, source))
    with pytest.raises(RequestError) as caught:
        provider.registration({"phone": "+1555"})
    assert (caught.value.condition, caught.value.error_type) == ("internal-server-error", "wait")
    assert "secret-value" not in caplog.text and "+1555" not in caplog.text
    assert "check_registration" in caplog.text


def test_what_sends_answers_mean() -> None:
    assert reply_of(None).outcome is DeliveryOutcome.DELIVERED
    assert reply_of(Delivered()).outcome is DeliveryOutcome.DELIVERED
    assert reply_of(RetryLater()).retry_after is None
    assert reply_of(RetryLater(5, "busy")) == reply_of(RetryLater(5.0, "busy"))
    assert reply_of(RetryLater(5, "busy")).retry_after == 5.0
    assert reply_of(RetryLater(10**9)).retry_after == 600.0  # bounded
    assert reply_of(RetryLater(-3)).retry_after == 1.0  # not at once (a busy loop)
    assert reply_of(Gone("410")).outcome is DeliveryOutcome.UNREGISTERED
    assert reply_of(Refused("bad")).outcome is DeliveryOutcome.FAILED
    wrong = reply_of("ok")
    assert wrong.outcome is DeliveryOutcome.FAILED and "returned str" in wrong.reason


def _device(fields: dict[str, str] | None = None) -> PushDevice:
    return PushDevice("alice@localhost", "phone", "", "any", "node-1", fields or {})


def test_an_exception_or_no_answer_is_a_retry_whose_text_stays_out(tmp_path: Path) -> None:
    source = ("import asyncio\nasync def send(device, notification):\n"
              "    if notification.urgent:\n        await asyncio.sleep(5)\n"
              "    raise RuntimeError('https://hooks.example/token-abc failed')\n")
    provider = load_provider(backend(tmp_path, source, timeout=0.05))
    reply = asyncio.run(provider.deliver(_device(), {"message-count": "1"}, False))
    assert reply.outcome is DeliveryOutcome.RETRY and reply.reason == "send raised RuntimeError"
    told = asyncio.run(provider.deliver(_device(), {}, False, log_sensitive=True))
    assert "token-abc" in told.reason  # the admin asked for it
    late = asyncio.run(provider.deliver(_device(), {}, True))
    assert late.outcome is DeliveryOutcome.RETRY and late.reason == "no answer within 0.05 s"


def test_send_gets_the_notification_and_the_backends_own_options(tmp_path: Path) -> None:
    provider = load_provider(backend(tmp_path, GOOD, url="https://hook", retries=[1, 2]))
    summary = {"message-count": "2", "last-message-sender": "bob@localhost/x",
               "last-message-body": "hi"}
    assert asyncio.run(provider.deliver(_device({"phone": "+1"}), summary, True)).outcome \
        is DeliveryOutcome.DELIVERED
    ((device, notification, options),) = provider.module.SENT
    assert device.fields == {"phone": "+1"}
    assert (notification.title, notification.text, notification.urgent) == (
        "bob@localhost", "hi", True)
    assert dict(notification.summary) == summary
    assert options == {"url": "https://hook", "retries": [1, 2]}  # not module, name, timeout
    with pytest.raises(TypeError):
        notification.summary["x"] = "y"  # type: ignore[index]


def test_a_reload_is_all_or_none(tmp_path: Path) -> None:
    backends = (backend(tmp_path, GOOD, 0), backend(tmp_path, GOOD, 1))
    providers = PythonProviders(backends)
    first, second = providers.get(0), providers.get(1)
    assert first is not None and second is not None
    (tmp_path / "provider_1.py").write_text("def send(:\n")
    with pytest.raises(ProviderError, match="python provider provider_1: it does not import"):
        providers.reload()
    assert providers.get(0) is first and providers.get(1) is second  # both stay
    (tmp_path / "provider_1.py").write_text(GOOD)
    assert providers.reload() == ["provider_0", "provider_1"]
    assert providers.get(0) is not first


def test_a_module_that_does_not_load_at_start_is_logged_and_its_pushes_wait(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    broken = backend(tmp_path, "import no_such_module_here\n")
    providers = PythonProviders((broken,))
    assert providers.get(0) is None
    assert "python provider provider_0" in caplog.text and "cannot be used" in caplog.text


def test_names_and_free_form_options_from_ejabberd() -> None:
    assert default_name("/etc/ejabberd/push/webhook.py") == "webhook"
    assert default_name("company.push.ntfy") == "ntfy"
    assert default_name("gotify") == "gotify"
    config = Config.from_options("localhost", {"certfile": b"/etc/cert.pem", "backends": [
        {"type": b"python", "module": b"/srv/hook.py", "register_host": b"localhost",
         "pubsub_host": b"pubsub.localhost", "url": b"https://x", "limits": [("per_day", 5)],
         "tags": [b"a", b"b"], "sandbox": True}]})
    (python,) = config.backends
    assert python.group == "hook"
    assert python.options == {"module": "/srv/hook.py", "name": "hook", "url": "https://x",
                              "limits": {"per_day": 5}, "tags": ["a", "b"], "sandbox": True}


# --------------------------------------------------------- registration and delivery

def _command(node: str, fields: dict[str, str] | None) -> bytes:
    form = "" if fields is None else (
        "<x xmlns='jabber:x:data' type='submit'>" + "".join(
            f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items()) + "</x>")
    return (f"<iq type='set' id='c1' from='alice@localhost/phone' to='localhost'>"
            f"<command xmlns='http://jabber.org/protocol/commands' node='{node}' "
            f"action='execute'>{form}</command></iq>").encode()


def test_devices_register_with_the_declared_fields(tmp_path: Path) -> None:
    python = backend(tmp_path, GOOD)
    store = Store(":memory:")
    config = Config("localhost", backends=(python,))
    server = AppServer(config, store, python_providers=PythonProviders(config.backends))
    (asked,) = server.handle(True, _command("register-push-provider_0", None))
    assert isinstance(asked, Route)
    form = ET.fromstring(asked.xml).iter("{jabber:x:data}field")
    assert [(f.get("var"), f.get("label")) for f in form] == [
        ("phone", "Phone number"), ("note", "Anything"), ("device-id", None),
        ("device-name", None)]
    (done,) = server.handle(True, _command("register-push-provider_0",
                                           {"phone": "+33 6", "device-name": "Phone"}))
    assert 'status="completed"' in str(done)
    (device,) = store.devices_of("alice@localhost")
    assert device.provider == "provider_0" and device.token == ""
    assert json.loads(device.extra) == {"phone": "+336", "note": ""}
    (refused,) = server.handle(True, _command("register-push-provider_0", {"phone": "06"}))
    assert "bad-request" in str(refused) and "must start with +" in str(refused)
    (unknown,) = server.handle(True, _command("register-push-nope", {"phone": "+1"}))
    assert "item-not-found" in str(unknown)
    # A provider whose module did not load takes no registrations (and says to wait).
    (tmp_path / "provider_0.py").write_text("def send(:\n")
    broken = AppServer(config, store, python_providers=PythonProviders(config.backends))
    (waiting,) = broken.handle(True, _command("register-push-provider_0", {"phone": "+1"}))
    assert "type=\"wait\"" in str(waiting) and "service-unavailable" in str(waiting)
    assert len(store.devices_of("alice@localhost")) == 1


def test_the_dispatcher_retries_then_delivers_and_forgets_gone_devices(
        tmp_path: Path) -> None:
    python = backend(tmp_path, GOOD)
    config = Config("localhost", backends=(python,))
    providers = PythonProviders(config.backends)
    provider = providers.get(0)
    assert provider is not None
    provider.module.ANSWERS.extend([RetryLater(0, "busy"), Delivered(), Gone("410")])
    store = Store(":memory:")
    device = RegisteredDevice("node-1", "s", "alice@localhost", "phone", "", "provider_0", "any",
                    "pubsub.localhost", "", extra=json.dumps({"phone": "+1"}))
    store.add_device(device)
    answers: list[str] = []
    gone: list[str] = []

    async def run() -> dict[tuple[str, str], int]:
        dispatcher = Dispatcher(config, store, gone.append, answers.append,
                                python_providers=providers)
        for number in (1, 2):
            dispatcher.submit(Delivery(python, device, {"message-count": str(number)},
                                       Iq(f"p{number}", "set", "localhost", "pubsub.localhost",
                                          None)))
            while sum(n for (_, o), n in dispatcher.counters.items() if o != "retried") < number:
                await asyncio.sleep(0.01)
        return dict(dispatcher.counters)

    counters = asyncio.run(run())
    assert counters == {("provider_0", "retried"): 1, ("provider_0", "delivered"): 1,
                        ("provider_0", "unregistered"): 1}
    sent = [n.summary["message-count"] for _, n, _ in provider.module.SENT]
    assert sent == ["1", "1", "2"]
    assert [d.fields for d, _, _ in provider.module.SENT] == [{"phone": "+1"}] * 3
    assert "type='result'" in answers[0] and "item-not-found" in answers[1]
    assert gone == ["node-1"]
    assert store.queued_pushes("") == []  # the retried one left the queue


@pytest.mark.parametrize("after", [0, -3, 0.001, float("nan")])
def test_a_python_provider_cannot_ask_to_be_retried_at_once(after: float) -> None:
    """RetryLater(0) would be tried again at once, over and over, for hours."""
    reply = reply_of(RetryLater(after))
    assert reply.retry_after is not None and 1.0 <= reply.retry_after <= 600.0
