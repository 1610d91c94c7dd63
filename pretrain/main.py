"""``deepspeed pretrain/main.py …`` and ``python pretrain/main.py …``: the script form of ``python -m pretrain``
(``pretrain.cli``). It imports the installed package (``pip install -e .``), so it needs no path changes."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
