"""Which devices a call rang on: each call's urgent pushes, per registration, kept for the
ring window so that the call's end (core/calls.call_end) reaches exactly those devices,
once, with a push that stops them ringing.

In memory only, bounded. It does not survive a restart, and need not: what it guards is
"one stop push per device that rang, and none to any other". A restart loses the calls
that were ringing, so their end sends nothing (a phone rings until its own timeout, 30 s
for Conversations, as it did before this existed); it can never send a stop push twice or
to a device that did not ring, because an entry is taken out when its stop pushes are
made, and those are in the outbox (retried, committed with the event) from then on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from pymod_push.core.calls import CallEnd
from pymod_push.protocol import UserKey

RegistrationKey = tuple[str, str, str, str]

# Calls ringing at once on this node; beyond it the oldest are forgotten (their end then
# stops nothing). A call is kept at most call_ring_window.
MAX_RINGING_CALLS = 100_000


@dataclass(slots=True)
class Ringing:
    caller: str  # the caller's bare JID: only they may retract, reject or finish it
    until: float  # end of the ring window: its end stops nothing after
    devices: set[RegistrationKey] = field(default_factory=set)


class RingingCalls:
    def __init__(self, limit: int = MAX_RINGING_CALLS) -> None:
        self.limit = limit
        self._calls: OrderedDict[tuple[UserKey, str], Ringing] = OrderedDict()

    def __len__(self) -> int:
        return len(self._calls)

    def rang(self, user: UserKey, sid: str, caller: str, device: RegistrationKey,
             until: float, now: float) -> None:
        """The call's urgent push went to device (a registration of user)."""
        if not sid or until <= now:
            return
        self._expire(now)
        ringing = self._calls.get((user, sid))
        if ringing is None or ringing.caller != caller:
            ringing = self._calls[(user, sid)] = Ringing(caller, until)
            while len(self._calls) > self.limit:
                self._calls.popitem(last=False)
        ringing.devices.add(device)

    def ended(self, user: UserKey, end: CallEnd, now: float) -> set[RegistrationKey]:
        """The devices to stop, once: those the call rang on, if it is ringing still (within
        its window) and the end comes from its caller or the user's own device."""
        self._expire(now)
        ringing = self._calls.get((user, end.sid))
        if ringing is None or ringing.until <= now \
                or (end.caller and end.caller != ringing.caller):
            return set()
        del self._calls[(user, end.sid)]
        return ringing.devices

    def _expire(self, now: float) -> None:
        """Drop calls whose window has ended (in order of their first push: windows are
        all the same length, so the oldest come first, near enough; the rest go later)."""
        calls = self._calls
        while calls:
            key, ringing = next(iter(calls.items()))
            if ringing.until > now:
                return
            del calls[key]
