"""``python -m muxpool``: the ``muxpool`` command."""

import sys

from .cli import main

sys.exit(main())
