"""``python -m pydra``: the same as the ``pydra`` command."""

import sys

from pydra.cli import main

sys.exit(main())
