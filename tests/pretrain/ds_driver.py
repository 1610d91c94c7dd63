"""Run several pre-training runs inside one ``deepspeed`` launch (tests only: shares the start-up cost).

    deepspeed --num_accelerators 2 tests/pretrain/ds_driver.py RUNS.json
RUNS.json holds a list of argument lists for ``pretrain/main.py``; each becomes a full run on every rank.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.cli import main  # noqa: E402

if __name__ == "__main__":
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    runs_file = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    for argv in json.loads(Path(runs_file).read_text()):
        code = main(argv + local_rank)
        if code:
            sys.exit(code)
