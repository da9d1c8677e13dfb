"""One ejabberd instance, through its ejabberdctl: where it is (``Ejabberd.locate``),
its commands, where its module sources and installed module are, and its configuration
(asked from the running node, else read from its files)."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pymod_push.install.ejabberd_config import (
    CONFLICTING,
    ConfigView,
    enabled_modules,
    read_config,
)
from pymod_push.install.errors import InstallError
from pymod_push.install.layout import (
    Layout,
    current_user,
    find_ctl,
    find_layout,
    modules_dir,
    switch_user,
)
from pymod_push.install.shim import MODULE


def ejabberd_version(status_output: str) -> str | None:
    match = re.search(r"ejabberd (\S+) is running", status_output)
    return match.group(1) if match else None


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass
class Ejabberd:
    """One ejabberd instance, through its ejabberdctl."""

    ctl: str
    config_dir: Path | None  # given with --config-dir: passed to ejabberdctl
    modules: Path
    layout: Layout = field(default_factory=lambda: Layout(None, {}, None))

    @property
    def user(self) -> str:
        return self.layout.user

    @classmethod
    def locate(cls, ctl: str | None, config_dir: Path | None,
               modules: Path | None, root: Path = Path("/")) -> Ejabberd:
        found = find_ctl(ctl, root)
        layout = find_layout(found if os.sep in found else (shutil.which(found) or found),
                             config_dir, read_or_none, root, os.environ)
        try:
            entry = pwd.getpwnam(layout.user)
        except KeyError:
            raise InstallError(f"there is no user '{layout.user}': is ejabberd "
                               "installed?") from None
        switch_user([], layout.user, os.geteuid(), current_user())  # root or that user
        if modules is None:
            modules = modules_dir(layout.settings, entry.pw_dir)
        return cls(found, config_dir, modules, layout)

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        command = [self.ctl, *(["--config-dir", str(self.config_dir)]
                               if self.config_dir else []), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise InstallError(f"{shlex.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}".rstrip())
        return result.stdout

    @property
    def sources(self) -> Path:
        return self.modules / "sources" / MODULE

    @property
    def installed_conf(self) -> Path:
        return self.modules / MODULE / "conf" / f"{MODULE}.yml"

    @property
    def installed_beam(self) -> Path:
        return self.modules / MODULE / "ebin" / f"{MODULE}.beam"

    def config_file(self) -> Path | None:
        return self.layout.config_file

    def files_view(self) -> ConfigView:
        main_file = self.config_file()
        if main_file is None:
            return ConfigView({}, [], [], ["no ejabberd.yml found (give --config-dir)"])
        return read_config(main_file, read_or_none, os.environ)

    def running_config(self) -> dict[str, Any] | None:
        """The node's effective configuration (``ejabberdctl dump_config``: included files
        and macros resolved), None if it cannot tell. The node writes the file as its user:
        a private directory in that user's home (systemd gives ejabberd a /tmp of its own),
        removed at once; the dump holds passwords, nothing of it is printed."""
        entry = pwd.getpwnam(self.user)
        home = Path(entry.pw_dir)
        base = str(home) if home.is_dir() and os.access(home, os.W_OK) else None
        directory = Path(tempfile.mkdtemp(prefix=".pymod_push-", dir=base))
        try:
            directory.chmod(0o700)
            if os.geteuid() == 0:
                os.chown(directory, entry.pw_uid, entry.pw_gid)
            dump = directory / "config.yml"
            try:
                self.run("dump_config", str(dump), timeout=60)
            except (InstallError, subprocess.SubprocessError):
                return None
            loaded = yaml.safe_load(read_or_none(dump) or "")
            return dict(loaded) if isinstance(loaded, Mapping) else None
        except yaml.YAMLError:
            return None
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def conflicts(self, running: bool) -> tuple[list[str], ConfigView, str]:
        """mod_push / mod_push_keepalive where enabled: in the running node's configuration
        when it runs, else in the files; the files say where."""
        view = self.files_view()
        config = self.running_config() if running else None
        source = "asked from the running node (ejabberdctl dump_config)"
        if config is None:
            config = view.config
            source = f"read from {', '.join(map(str, view.files)) or 'no file'}"
        found = sorted(enabled_modules(config) & set(CONFLICTING))
        view.config = config
        return found, view, source
