"""``python -m denselm ...``: the same as the ``denselm`` command."""

import sys

from denselm.cli import main

sys.exit(main())
