"""Entry point of the port program: ``python -m pymod_push`` (started by mod_push_py)."""

import sys

from .port import main

sys.exit(main())
