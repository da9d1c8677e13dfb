"""The built-in app server's devices (SQLite: kept in memory once read)."""

from __future__ import annotations

import time

from pymod_push.records import RegisteredDevice
from pymod_push.store import base
from pymod_push.store.base import StoreBase, _kept
from pymod_push.store.schema import _DEVICE_COLUMNS


class DeviceTable(StoreBase):
    """The built-in app server's devices (SQLite: kept in memory once read)."""

    def device_count(self, user: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM devices WHERE user=?",
                                   (user,)).fetchone()[0])

    # ------------------------------------------------------------- devices
    def add_device(self, device: RegisteredDevice) -> list[str]:
        """Store a device; an earlier registration of the same device and provider is
        replaced. Returns the nodes it replaced."""
        replaced = [row[0] for row in self.db.execute(
            "SELECT node FROM devices WHERE user=? AND device_id=? AND provider=? AND app_name=?",
            (device.user, device.device_id, device.provider, device.app_name))]
        self.db.executemany("DELETE FROM devices WHERE node=?", [(n,) for n in replaced])
        self._devices_changed([*replaced, device.node])
        self.db.execute(f"INSERT INTO devices ({_DEVICE_COLUMNS}, created_at) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (device.node, device.secret, device.user, device.device_id,
                         device.device_name, device.provider, device.app_name,
                         device.pubsub_host, device.token, device.application_id,
                         device.p256dh, device.auth, device.voip_token, device.extra,
                         time.time()))
        return replaced

    def device(self, node: str) -> RegisteredDevice | None:
        """The device with that node; with SQLite from memory once read."""
        if self._pg is None and node in self._devices:
            return self._devices[node]
        row = self.db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE node=?",
                              (node,)).fetchone()
        device = RegisteredDevice(*row) if row else None
        if self._pg is not None:
            return device
        return _kept(self._devices, node, device, base.DEVICE_MEMORY)

    def _devices_changed(self, nodes: list[str]) -> None:
        for node in nodes:
            self._devices.pop(node, None)

    def devices_of(self, user: str) -> list[RegisteredDevice]:
        return [RegisteredDevice(*row) for row in self.db.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user=? ORDER BY created_at, node",
            (user,))]

    def remove_devices(self, user: str, nodes: list[str] | None = None,
                       device_id: str | None = None) -> list[str]:
        """Remove a user's devices by node list, else by device id; the removed nodes."""
        removed = [d.node for d in self.devices_of(user)
                   if (d.node in nodes if nodes is not None else d.device_id == device_id)]
        self.db.executemany("DELETE FROM devices WHERE node=?", [(n,) for n in removed])
        self._devices_changed(removed)
        return removed

    def remove_device(self, node: str) -> None:
        self.db.execute("DELETE FROM devices WHERE node=?", (node,))
        self._devices_changed([node])
