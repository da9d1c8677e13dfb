"""What the shim and Python must agree on, computed here from the module's options and sent to
the shim in Python's hello reply (docs/protocol.md, "Handshake"): the shim keeps it and answers
ejabberd's hooks with it, without a round trip and without a copy of its own.

- ``features``: the account's disco#info features: XEP-0357's, and Tigase's push extensions
  (core/ios_extensions.FEATURES) when ``ios_extensions`` is on.
- ``commands``: the built-in app server's ad-hoc commands on the module's host itself (backends
  whose ``register_host`` is the host), ``(node, name)`` in the order disco#items lists them.
  The shim lists them among ejabberd's own commands and takes them out of the sender's stream
  for Python. Last, the push check-up (``push-diagnose``), listed to local users only.
  The app server's other registration hosts list theirs with the same
  :func:`command_items`.

What the shim needs before Python runs is not here: ejabberd validates the options (and
refuses a Python provider whose name, given or derived from its module, is a shipped
provider's) before any Python process starts; core.config.default_name names the provider.
The ``push_iq_rate`` rule is the shim's alone: it answers the refusal without asking Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymod_push.core import ios_extensions
from pymod_push.core.config import COMMAND_GROUPS, Backend, Config
from pymod_push.core.xep0357 import NS_PUSH

REGISTER_PREFIX = "register-push-"
LIST_COMMAND = "list-push-registrations"
UNREGISTER_COMMAND = "unregister-push"
# The push check-up of users themselves (service/diagnosis.py): on the module's host always,
# for its own users (the shim lists it to them only).
DIAGNOSE_COMMAND, DIAGNOSE_NAME = "push-diagnose", "Push notifications check-up"
# What disco#items calls register-push-TYPE, for each shipped type (a Python provider's
# command is called by its name): gcm and mozilla are the older names of fcm and webpush.
COMMAND_LABELS = {"apns": "APNs", "fcm": "FCM", "gcm": "FCM (gcm)", "webpush": "Web Push",
                  "mozilla": "Web Push (mozilla)", "ubuntu": "Ubuntu Push", "wns": "WNS"}


def account_features(config: Config) -> tuple[str, ...]:
    """The features an account's disco#info lists for push."""
    return (NS_PUSH, *ios_extensions.FEATURES) if config.ios_extensions else (NS_PUSH,)


def command_items(backends: Iterable[Backend]) -> list[tuple[str, str]]:
    """(node, name) of the app server's commands on one registration host, given the backends
    registered there: for each provider (shipped ones by name, then Python providers by name)
    its register-push-* commands, named with the apps it serves; then listing and
    unregistering, when there is any."""
    apps: dict[str, set[str]] = {}
    python: set[str] = set()
    for backend in backends:
        apps.setdefault(backend.group, set()).add(backend.app_name)
        if backend.type == "python":
            python.add(backend.group)
    items = []
    for group in sorted(apps, key=lambda group: (group in python, group)):
        aliases = ([group] if group in python else
                   [type_ for type_, of in COMMAND_GROUPS.items() if of == group])
        names = ", ".join(sorted(apps[group]))
        items += [(REGISTER_PREFIX + alias, f"Register at {COMMAND_LABELS.get(alias, alias)} "
                                            f"({names})") for alias in aliases]
    if items:
        items += [(LIST_COMMAND, "List push registrations"),
                  (UNREGISTER_COMMAND, "Unregister push devices")]
    return items


def hello_facts(config: Config) -> dict[str, Any]:
    """The fields of the hello reply that the shim keeps (its meta table) and uses."""
    return {"features": list(account_features(config)),
            "commands": [*command_items(b for b in config.backends
                                        if b.register_host == config.host),
                         (DIAGNOSE_COMMAND, DIAGNOSE_NAME)]}
