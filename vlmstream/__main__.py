"""``python -m vlmstream inspect ...`` / ``python -m vlmstream bench ...``: the same as the `vlmstream` command."""

import sys

from .cli.main import main

sys.exit(main())
