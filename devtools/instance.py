"""A throwaway ejabberd in a folder of its own, with mod_push_py installed by module_install.

Used by the end-to-end tests and by ``make run``. Everything lives in the
instance folder (config, spool with Mnesia and the SQLite database, logs, module
sources); its own node name and free ports on 127.0.0.1 keep instances apart.

    python -m devtools.instance start DIR     # make run
    python -m devtools.instance stop DIR      # make stop
"""

from __future__ import annotations

import argparse
import itertools
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pymod_push.install.module_source import seal

ROOT = Path(__file__).resolve().parent.parent
EJABBERD_USER = "ejabberd"


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, below Linux's ephemeral range (32768-60999) so that
    no outgoing connection takes it as its local port before its listener binds it, and
    not one this process handed out before."""
    while True:
        port = random.randrange(20_000, 32_000)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def default_python() -> str:
    """The project's virtual environment (from /usr/bin/python3: uid ejabberd can run it)."""
    return str(ROOT / ".venv" / "bin" / "python")


@dataclass
class Instance:
    folder: Path
    options: dict[str, Any] = field(default_factory=dict)  # mod_push_py's, besides python
    host: str = "localhost"
    name: str = ""
    c2s_port: int = 0
    dist_port: int = 0
    modules: dict[str, Any] = field(default_factory=dict)  # added to the defaults; None removes
    extra_config: dict[str, Any] = field(default_factory=dict)  # acl, access_rules, ...
    s2s_port: int = 0  # listen for other servers here (0: no s2s)
    s2s_ip: str = "127.0.0.1"
    s2s_peer_port: int = 0  # where the other servers listen (outgoing_s2s_port)
    extra_hosts: list[str] = field(default_factory=list)  # names Erlang resolves to 127.0.0.1
    # Cluster members find each other through epmd; a lone instance listens on its own
    # distribution port instead (no epmd, nothing shared with other instances).
    clustered: bool = False
    python: str = field(default_factory=default_python)
    max_stanza_size: int = 262144  # of c2s streams
    # UnifiedPush: an ejabberd_http listener on 127.0.0.1:http_port with mod_push_py as the
    # request handler of /up, and unified_push_url pointing at it (unless options set one).
    unified_push: bool = False
    http_port: int = 0
    _config: dict[str, Any] | None = field(default=None, init=False, repr=False)
    # CONTRIB_MODULES_PATH elsewhere (e.g. a prebuilt, read-only module folder): nothing is
    # staged there, start(install=False) loads what it holds.
    modules_path: Path | None = None

    def __post_init__(self) -> None:
        self.folder = self.folder.resolve()
        self.name = self.name or f"pymodpush{os.getpid()}x{free_port()}"
        self.c2s_port = self.c2s_port or free_port()
        self.dist_port = self.dist_port or free_port()
        if self.unified_push:
            self.http_port = self.http_port or free_port()

    # ------------------------------------------------------------------ layout
    @property
    def log_file(self) -> Path:
        return self.folder / "logs" / "ejabberd.log"

    @property
    def spool(self) -> Path:
        return self.folder / "spool"

    @property
    def up_url(self) -> str:
        """The base URL of the UnifiedPush request handler (unified_push_url)."""
        return f"http://127.0.0.1:{self.http_port}/up"

    def write_config(self) -> None:
        for sub in ("spool", "logs", "modules/sources"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "ejabberdctl.cfg").write_text(
            f"ERLANG_NODE={self.name}@localhost\n"
            f"SPOOL_DIR={self.spool}\n"
            f"LOGS_DIR={self.folder / 'logs'}\n"
            f"EJABBERD_CONFIG_PATH={self.folder / 'ejabberd.yml'}\n"
            f"CONTRIB_MODULES_PATH={self.modules_path or self.folder / 'modules'}\n"
            + ("" if self.clustered else f"ERL_DIST_PORT={self.dist_port}\n") +
            "INET_DIST_INTERFACE=127.0.0.1\n"
            "EJABBERD_BYPASS_WARNINGS=true\n")
        inetrc = Path("/etc/ejabberd/inetrc").read_text()
        if self.extra_hosts:
            names = ", ".join(f'"{name}"' for name in self.extra_hosts)
            inetrc += f"{{host, {{127,0,0,1}}, [{names}]}}.\n"
        (self.folder / "inetrc").write_text(inetrc)
        modules: dict[str, Any] = {
            "mod_adhoc": {}, "mod_disco": {}, "mod_roster": {}, "mod_offline": {},
            "mod_caps": {}, "mod_client_state": {}, "mod_mam": {}, "mod_admin_extra": {},
            "mod_carboncopy": {}, "mod_muc": {"host": "conference.@HOST@"},
            "mod_stream_mgmt": {"resume_timeout": 300, "resend_on_timeout": "if_offline"},
        }
        modules.update(self.modules)
        modules = {name: opts for name, opts in modules.items() if opts is not None}  # None: off
        config = {
            "hosts": [self.host],
            "loglevel": "info",
            "log_rotate_count": 0,
            "certfiles": [],
            "listen": [{"port": self.c2s_port, "ip": "127.0.0.1", "module": "ejabberd_c2s",
                        "max_stanza_size": self.max_stanza_size}],
            "auth_method": "internal",
            "acl": {"local": {"user_regexp": ""}},
            "modules": modules,
            **self.extra_config,
        }
        if self._http_listener():
            config["listen"].append(self._up_listener())
        if self.s2s_port:
            config["listen"].append({"port": self.s2s_port, "ip": self.s2s_ip,
                                     "module": "ejabberd_s2s_in"})
            config["outgoing_s2s_port"] = self.s2s_peer_port
            config["outgoing_s2s_families"] = ["ipv4"]
            config["s2s_use_starttls"] = False
            modules["mod_s2s_dialback"] = {}
        self._config = config
        (self.folder / "ejabberd.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        if self.modules_path is None:
            self._stage_module_sources()
        subprocess.run(["chown", "-R", f"{EJABBERD_USER}:{EJABBERD_USER}", str(self.folder)],
                       check=True)

    def _up_listener(self) -> dict[str, Any]:
        return {"port": self.http_port, "ip": "127.0.0.1", "module": "ejabberd_http",
                "request_handlers": {"/up": "mod_push_py"}}

    def _http_listener(self) -> bool:
        """ejabberd refuses a config whose request_handlers name a module it cannot load:
        the /up listener is there once mod_push_py is installed (install() adds it)."""
        return self.unified_push and (self.modules_path is not None
                                      or (self.folder / "modules" / "mod_push_py").is_dir())

    def _add_up_listener(self) -> None:
        """After the first module_install: the /up listener, by reload_config."""
        config = self._config
        if config is None or self._up_listener() in config["listen"]:
            return
        config["listen"].append(self._up_listener())
        path = self.folder / "ejabberd.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run(["chown", f"{EJABBERD_USER}:{EJABBERD_USER}", str(path)], check=True)
        self.ctl("reload_config")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.http_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no HTTP listener on {self.http_port} after "
                                       f"reload_config\n{self.log_tail()}") from None
                time.sleep(0.05)

    def _stage_module_sources(self) -> None:
        """erl_shim from the working tree, with this instance's options in its conf file."""
        target = self.folder / "modules" / "sources" / "mod_push_py"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "erl_shim", target)
        options = dict(self.options)
        if self.unified_push:
            options.setdefault("unified_push_url", self.up_url)
        conf = {"modules": {"mod_push_py": {"python": self.python, **options}}}
        (target / "conf" / "mod_push_py.yml").write_text(yaml.safe_dump(conf, sort_keys=False))
        seal(target)  # the spec's url and home, as 'pymod-push install' stages them

    # ---------------------------------------------------------------- control
    def ctl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(["ejabberdctl", "--config-dir", str(self.folder), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"ejabberdctl {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}\n--- log tail:\n"
                               f"{self.log_tail()}")
        return result.stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_python(self) -> None:
        """The port program runs as uid ejabberd: make sure it can import the package."""
        result = subprocess.run(["runuser", "-u", EJABBERD_USER, "--", self.python, "-c",
                                 "import pymod_push"], capture_output=True, text=True, cwd="/")
        if result.returncode != 0:
            raise RuntimeError(f"user {EJABBERD_USER} cannot run {self.python} -c 'import "
                               f"pymod_push': {result.stderr.strip()}")

    def start(self, install: bool = True) -> None:
        self.check_python()
        self.ctl("start")
        self.ctl("started", timeout=120)
        if install:
            self.install()

    def install(self) -> None:
        """module_install, or module_upgrade (working-tree changes) when already installed."""
        mark = self.log_mark()
        # Where module_install puts it (CONTRIB_MODULES_PATH): no ejabberdctl call to ask.
        installed = (self.folder / "modules" / "mod_push_py").is_dir()
        self.ctl("module_upgrade" if installed else "module_install", "mod_push_py")
        self.wait_ready(mark)
        if self.unified_push:
            self._add_up_listener()

    def wait_ready(self, mark: int = 0) -> None:
        self.wait_for_log(rf"Python process ready on {re.escape(self.host)}\b", mark)

    def log_mark(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def wait_for_log(self, pattern: str, mark: int = 0, timeout: float = 60) -> str:
        """Wait until the log, from byte offset ``mark``, has a line matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log_file, "rb") as handle:
                    handle.seek(mark)
                    text = handle.read().decode(errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line matching {pattern!r} within {timeout} s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    def join_cluster(self, other: Instance) -> None:
        """Join other's cluster (this node's Mnesia is replaced by the cluster's), and wait
        until this node serves again with mod_push_py."""
        mark = self.log_mark()
        self.ctl("join_cluster", other.node, timeout=180)
        self.ctl("started", timeout=120)
        self.wait_ready(mark)

    def erl(self, expressions: str, timeout: float = 120) -> str:
        """Evaluate Erlang expressions (``A = f(), g(A)``, no final dot) in the running node
        and return the value, printed with ~p. The caller is a hidden node that connects as
        ejabberdctl does (uid ejabberd for the cookie, this instance's distribution port)."""
        program = (
            'Node = list_to_atom(os:getenv("PYMOD_NODE")),'
            '{ok, Ts, _} = erl_scan:string(os:getenv("PYMOD_EXPRS") ++ "."),'
            '{ok, Es} = erl_parse:parse_exprs(Ts),'
            f'case rpc:call(Node, erl_eval, exprs, [Es, []], {int(timeout * 1000)}) of'
            '  {value, V, _} -> io:format("~p~n", [V]), halt(0);'
            '  Bad -> io:format("~p~n", [Bad]), halt(1)'
            ' end.')
        dist = ([] if self.clustered else
                ["-erl_epmd_port", str(self.dist_port), "-dist_listen", "false",
                 "-start_epmd", "false"])
        home = pwd.getpwnam(EJABBERD_USER).pw_dir  # where the node's cookie is
        result = subprocess.run(
            ["runuser", "-u", EJABBERD_USER, "--", "env", f"HOME={home}",
             f"ERL_INETRC={self.folder / 'inetrc'}", f"PYMOD_NODE={self.node}",
             f"PYMOD_EXPRS={expressions}", "erl", "-noshell", "-hidden",
             "-sname", f"rpc{os.getpid()}x{random.randrange(10**6)}@localhost", *dist,
             "-eval", program],
            capture_output=True, text=True, timeout=timeout + 30, cwd="/")
        if result.returncode != 0:
            raise RuntimeError(f"erl in {self.node} failed: {result.stdout}{result.stderr}")
        return result.stdout.strip()

    def register(self, user: str, host: str, password: str) -> None:
        self.ctl("register", user, host, password)

    def stop(self) -> None:
        if self.ctl("status", check=False, timeout=30).strip().startswith("The node"):
            self.ctl("stop", check=False)
            self.ctl("stopped", check=False, timeout=120)

    def family(self) -> dict[int, list[str]]:
        """This node's VM and the processes it started (erl_child_setup, the Python
        process...) with their arguments, by pid; empty when the node does not run."""
        processes = _processes()
        family = {pid for pid, (_, args) in processes.items()
                  if args and args[0].endswith("beam.smp") and self.node in args}
        while grown := {pid for pid, (parent, _) in processes.items()
                        if parent in family} - family:
            family |= grown
        return {pid: processes[pid][1] for pid in family}

    def vm_pid(self) -> int | None:
        return next((pid for pid, args in self.family().items()
                     if args[0].endswith("beam.smp")), None)

    def python_pid(self) -> int | None:
        """The port program under this node's VM (not another instance's)."""
        return next((pid for pid, args in self.family().items()
                     if ("-m", "pymod_push") in itertools.pairwise(args)), None)

    def discard(self) -> None:
        """The end of a throwaway instance (a test's, its folder deleted next): its VM
        killed at once, then waited for with what it started (the Python process ends
        when its port closes). A graceful stop takes about 5 s (three ejabberdctl calls
        and the shutdown), for each of the suite's instances, in each of CI's three runs."""
        family = self.family()
        for pid, args in family.items():
            if args[0].endswith("beam.smp"):
                _kill(pid, signal.SIGKILL)
        for _ in range(2):  # the second time, after killing what did not see its port close
            deadline = time.monotonic() + 10
            while (alive := [pid for pid in family if _alive(pid)]) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            if not alive:
                return
            for pid in alive:
                _kill(pid, signal.SIGKILL)


def _processes() -> dict[int, tuple[int, list[str]]]:
    """Every process: its parent and its arguments."""
    found: dict[int, tuple[int, list[str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = [a.decode(errors="replace") for a in cmdline.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        found[int(entry)] = (parent, args)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie is not: its parent, init, may never reap it in a container)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _kill(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def _owner_ok() -> bool:
    try:
        pwd.getpwnam(EJABBERD_USER)
    except KeyError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if not _owner_ok():
        print("ejabberd is not installed (no user 'ejabberd'): run 'make deps'", file=sys.stderr)
        return 1
    state_file = args.folder / "instance.yml"
    if args.command == "stop":
        if not state_file.exists():
            print(f"no instance in {args.folder}")
            return 0
        saved = yaml.safe_load(state_file.read_text())
        Instance(args.folder, name=saved["name"], c2s_port=saved["c2s_port"],
                 dist_port=saved["dist_port"]).stop()
        print(f"stopped the ejabberd in {args.folder}")
        return 0
    if state_file.exists():
        saved = yaml.safe_load(state_file.read_text())
        instance = Instance(args.folder, name=saved["name"], c2s_port=saved["c2s_port"],
                            dist_port=saved["dist_port"])
        instance.stop()
    else:
        instance = Instance(args.folder)
    instance.write_config()
    state_file.write_text(yaml.safe_dump({"name": instance.name,
                                          "c2s_port": instance.c2s_port,
                                          "dist_port": instance.dist_port}))
    instance.start()
    for user in ("alice", "bob"):
        instance.ctl("register", user, "localhost", user, check=False)  # may exist already
    print(f"""
ejabberd is running with mod_push_py (node {instance.name}@localhost).
  XMPP (plain c2s, no TLS): 127.0.0.1:{instance.c2s_port}, domain localhost
  users: alice@localhost (password alice), bob@localhost (password bob)
  log:   {instance.log_file}
  state: {instance.spool} (SQLite: pymod_push_localhost.sqlite3)
  ctl:   ejabberdctl --config-dir {instance.folder} <command>
  stop:  make stop
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
