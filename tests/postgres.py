"""A throwaway PostgreSQL server on 127.0.0.1 (Debian's package), run as the postgres user
(initdb refuses root), in a folder of its own; a fresh database per test or module."""

from __future__ import annotations

import asyncio
import glob
import itertools
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg

from devtools.instance import free_port

USER = "postgres"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run the tests with 'make test'")
    return found[-1]


class PostgresServer:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pymod_push-postgres-"))
        self.port = free_port()
        self._names = itertools.count(1)
        shutil.chown(self.folder, USER, USER)
        self._as_postgres(_bin("initdb"), "-D", str(self.folder / "data"), "-A", "trust",
                          "-U", USER, "--no-sync", "-E", "UTF8")
        self.start()

    def start(self) -> None:
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.folder / "data"), "-l",
                          str(self.folder / "log"), "-w", "-o",
                          f"-p {self.port} -k {self.folder} -h 127.0.0.1 -F", "start")

    def halt(self) -> None:
        """Stop the server as an outage would (its connections cut); start() again."""
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w",
                          "stop")

    def _as_postgres(self, *command: str) -> None:
        result = subprocess.run(["runuser", "-u", USER, "--", *command], capture_output=True,
                                text=True, cwd=self.folder, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout}{result.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"push{next(self._names)}"

        async def create() -> None:
            connection = await asyncpg.connect(self.url())
            try:
                await connection.execute(f"CREATE DATABASE {name}")
            finally:
                await connection.close()

        asyncio.run(create())
        return self.url(name)

    def stop(self) -> None:
        try:
            self._as_postgres(_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m",
                              "immediate", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
