"""``python -m pymod_push.install``: the same as the ``pymod-push`` command."""

import sys

from pymod_push.install import main

sys.exit(main())
