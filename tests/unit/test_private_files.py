"""What the Python process writes is its user's alone (issue 29, row 11): the SQLite database
and its -wal and -shm files are created 0600 whatever the umask, an earlier version's wider
modes are narrowed, and ``python -m pymod_push`` runs with umask 077."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymod_push import etf
from pymod_push.etf import Atom
from pymod_push.protocol import PROTOCOL_VERSION
from pymod_push.store import Store

WAL_FILES = ("", "-wal", "-shm")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_database_and_its_wal_files_are_the_owners_alone(tmp_path: Path) -> None:
    path = tmp_path / "push.sqlite3"
    with umask(0o022):
        store = Store(str(path))
        store.db.execute("INSERT INTO pushed (id, user, server, resource, mark) VALUES "
                         "(1, 'a', 'b', 'c', 2)")
        store.commit()
        try:
            assert {suffix: mode(Path(f"{path}{suffix}")) for suffix in WAL_FILES} == \
                dict.fromkeys(WAL_FILES, 0o600)
        finally:
            store.close()


def test_an_earlier_versions_readable_files_are_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "push.sqlite3"
    with umask(0o022):
        Store(str(path)).close()
        for suffix in WAL_FILES:
            Path(f"{path}{suffix}").touch()
            os.chmod(f"{path}{suffix}", 0o644)
        store = Store(str(path))
        try:
            assert {suffix: mode(Path(f"{path}{suffix}")) for suffix in WAL_FILES} == \
                dict.fromkeys(WAL_FILES, 0o600)
        finally:
            store.close()


def _frame(term: Any) -> bytes:
    payload = etf.encode(term)
    return struct.pack(">I", len(payload)) + payload


def _read_term(process: subprocess.Popen[bytes]) -> Any:
    assert process.stdout is not None
    (size,) = struct.unpack(">I", process.stdout.read(4))
    return etf.decode(process.stdout.read(size))


def test_the_port_program_runs_with_umask_077(tmp_path: Path) -> None:
    """Started as ejabberd starts it, from a umask that lets others read: the process's
    umask (/proc) is 077 and its database files are 0600."""
    database = tmp_path / "push.sqlite3"
    with umask(0o002):
        process = subprocess.Popen([sys.executable, "-P", "-m", "pymod_push"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert process.stdin is not None
        process.stdin.write(_frame((Atom("hello"), PROTOCOL_VERSION, b"localhost",
                                    {Atom("db_file"): str(database).encode()})))
        process.stdin.flush()
        while not (isinstance(term := _read_term(process), tuple) and term[0] == "hello"):
            pass  # log frames before the hello's answer
        with open(f"/proc/{process.pid}/status") as status:
            umask_line = next(line for line in status if line.startswith("Umask:"))
        assert umask_line.split()[1] == "0077"
        assert mode(database) == 0o600
        assert all(mode(Path(f"{database}{suffix}")) == 0o600 for suffix in WAL_FILES
                   if Path(f"{database}{suffix}").exists())
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(10)
