"""``pymod-push``: install, upgrade, uninstall and check mod_push_py in an ejabberd.

    pymod-push install     # the shim to ejabberd's module sources, python = this interpreter
    pymod-push install --replace-builtin   # also comments out mod_push, mod_push_keepalive
    pymod-push upgrade     # the same sources again (after a pip upgrade), module_upgrade
    pymod-push uninstall
    pymod-push doctor      # versions, conflicts, permissions, exposure, the Python process
    pymod-push logic check FILE   # your push logic on sample stanzas (see logic_check)

Run it as root (or as the ejabberd user) with the interpreter of the virtual environment
that has pymod_push. It finds ``ejabberdctl`` on the PATH, in /usr/sbin, /opt/ejabberd-*/bin
(ProcessOne's installers), /opt/ejabberd/bin or /home/ejabberd/bin (container images);
``--ctl`` and ``--config-dir`` pick another instance. The configuration is asked from the
running node (``ejabberdctl dump_config``), else read from its files (included files and
macros count).

This folder, one file per job (each imports only the ones below it):

- ``__init__``: ``main``, the command line (``logic`` goes to pymod_push.logic_check);
- ``commands``: install, upgrade, uninstall, ``--replace-builtin``;
- ``doctor``: what the doctor gathers and concludes;
- ``build_module``: ``pymod-push build-module``, a prebuilt module folder;
- ``instance``: one ejabberd through its ejabberdctl (``Ejabberd``);
- ``ejabberd_config``: ejabberd.yml with its includes and macros, the conflicting entries;
- ``layout``: where ejabberdctl, ejabberdctl.cfg, the user, the modules are; acting as
  that user;
- ``shim``: the module's name, sources and conf file; ``module_source``: the staged
  spec's url and home, the sources' tarball;
- ``errors``: ``InstallError``.

The decisions are plain functions (where ejabberd is, its layout, which lines enable
mod_push, how to become the ejabberd user, what the doctor concludes); ``Ejabberd``,
``gather``, the commands and ``main`` do the I/O.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pymod_push.install.commands import install, uninstall
from pymod_push.install.doctor import diagnose, gather
from pymod_push.install.errors import InstallError
from pymod_push.install.instance import Ejabberd

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["logic"]:  # pymod-push logic check FILE: the admin's push logic, offline
        from pymod_push.logic_check import main as logic_main
        return logic_main(argv[1:])
    if argv[:1] == ["build-module"]:  # a prebuilt module folder (build_module.py)
        from pymod_push.install.build_module import main as build_module_main
        return build_module_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pymod-push", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "upgrade", "uninstall", "doctor", "logic"],
                        help="logic: 'pymod-push logic check FILE' tries your push logic")
    parser.add_argument("--ctl", help="ejabberdctl to use (default: the one on PATH, else "
                        "in /usr/sbin, /opt/ejabberd-*/bin, /opt/ejabberd/bin, "
                        "/home/ejabberd/bin)")
    parser.add_argument("--config-dir", type=Path,
                        help="ejabberd's configuration directory (ejabberdctl --config-dir)")
    parser.add_argument("--modules-dir", type=Path,
                        help="ejabberd's CONTRIB_MODULES_PATH (default: from ejabberdctl.cfg, "
                        "else ~ejabberd/.ejabberd-modules)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter ejabberd runs (default: this one)")
    parser.add_argument("--replace-builtin", action="store_true",
                        help="install/upgrade: comment out mod_push and mod_push_keepalive "
                        "where they are enabled (a backup kept), then reload_config")
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        server = Ejabberd.locate(args.ctl, args.config_dir, args.modules_dir, args.root)
        if args.command in ("install", "upgrade"):
            install(server, args.python, args.command == "upgrade", print,
                    args.replace_builtin)
        elif args.command == "uninstall":
            uninstall(server, print)
        else:
            findings = diagnose(gather(server))
            for finding in findings:
                label = "ok   " if finding.ok and not finding.warn else \
                    "WARN " if finding.ok else "FAIL "
                print(label + finding.text)
            return 0 if all(finding.ok for finding in findings) else 1
    except InstallError as exc:
        print(f"pymod-push {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError, yaml.YAMLError) as exc:
        print(f"pymod-push {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
