"""Cookbook: routing by domain. One ejabberd serves several domains (tenants) whose apps
differ: each domain's pushes say which tenant they are for, so that one app build can
show the right brand, and a domain can keep message text off the push providers
altogether, whatever its users chose.

    modules:
      mod_push_py:
        logic: /etc/ejabberd/push/by_domain.py

Edit TENANTS and ``ejabberdctl push_reload_logic HOST``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pymod_push.logic import Device, Message, Recipient

# domain -> what its pushes carry. "private": no sender and no text leaves the server.
TENANTS: dict[str, dict[str, str | bool]] = {
    "example.org": {"tenant": "verona", "private": False},
    "clinic.example.org": {"tenant": "clinic", "private": True},
}
PRIVATE_FIELDS = ("last-message-sender", "last-message-body", "last-subscription-sender")


def summary(message: Message, recipient: Recipient,
            fields: Mapping[str, str]) -> Mapping[str, str]:
    tenant = TENANTS.get(recipient.server)
    if tenant and tenant["private"]:
        return {k: v for k, v in fields.items() if k not in PRIVATE_FIELDS}
    return fields


def provider_data(device: Device, data: Mapping[str, str]) -> Mapping[str, str]:
    tenant = TENANTS.get(device.user.partition("@")[2])
    if tenant is None:
        return data
    shown = data
    if tenant["private"]:
        shown = {k: v for k, v in data.items() if k not in PRIVATE_FIELDS}
    return {**shown, "tenant": str(tenant["tenant"])}
