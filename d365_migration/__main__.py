"""``python -m d365_migration`` — see ``cli.py``."""

import sys

from .cli import main

sys.exit(main())
