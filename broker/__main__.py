"""``python -m broker`` is ``sbroker``."""

import sys

from .cli import main

sys.exit(main())
