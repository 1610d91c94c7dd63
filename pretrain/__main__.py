"""``python -m pretrain`` and ``deepspeed --module pretrain``: see ``pretrain.cli``."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
