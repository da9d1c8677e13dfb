"""A push service over a fresh store of either database, for the service's unit tests:
tests that use the ``database`` fixture run once on SQLite and once on PostgreSQL, and
``make_service`` opens its store on the database of the run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from pymod_push.core.config import Config
from pymod_push.service.decisions import PushService
from pymod_push.store import Store, open_store

_new_store: list[Callable[[], Store]] = [lambda: Store(":memory:")]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.param == "sqlite":
        yield
        return
    server: Any = request.getfixturevalue("postgres")
    opened: list[Store] = []

    def new_store() -> Store:
        opened.append(open_store("", server.new_database()))
        return opened[-1]
    _new_store.append(new_store)
    try:
        yield
    finally:
        _new_store.pop()
        for store in opened:
            store.close()


def make_service(**options: object) -> PushService:
    return PushService(replace(Config("example.org"), **options), _new_store[-1]())
