"""Entry point of the port program: ``python -m pymod_push`` (started by mod_push_py)."""

import os
import sys

# Before anything is created: what this process writes (the SQLite database and its WAL,
# which hold secrets) is its user's alone, whatever umask ejabberd was started with.
PROCESS_UMASK = 0o077
os.umask(PROCESS_UMASK)

from pymod_push.port.app import main  # noqa: E402 - after the umask, as whatever it imports may write

sys.exit(main())
