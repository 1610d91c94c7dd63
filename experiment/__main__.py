"""``python -m experiment``: see ``experiment.cli``."""

import sys

from experiment.cli import main

if __name__ == "__main__":
    sys.exit(main())
