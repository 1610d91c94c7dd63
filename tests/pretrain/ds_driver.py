"""Run several pre-training runs inside one ``deepspeed`` launch (tests only: shares the start-up cost).

    deepspeed --num_accelerators 2 tests/pretrain/ds_driver.py RUNS.json
RUNS.json holds a list of argument lists for ``pretrain/main.py``; each becomes a full run on every rank. An
entry ``{"argv": [...], "interrupt_at": "step00000002"}`` stops that run on every rank right after it wrote
that checkpoint, as a crash would (a later entry can resume it with ``--resume auto``); ``"kill_at"`` instead
kills the process there with SIGKILL (a single-process run: the test sees the process die).
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.cli import main  # noqa: E402
from pretrain.trainer import Trainer, tag_for  # noqa: E402


class Interrupted(Exception):
    pass


def interrupt_at(tag: str, kill: bool = False):
    """Make ``Trainer.checkpoint`` raise ``Interrupted`` (or SIGKILL the process) once checkpoint ``tag`` is on disk."""
    original = Trainer.checkpoint

    def checkpoint(self):
        original(self)
        if tag_for(self.step) == tag:
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Interrupted(tag)

    Trainer.checkpoint = checkpoint
    return original


if __name__ == "__main__":
    local_rank = [a for a in sys.argv[1:] if a.startswith("--local_rank")]
    runs_file = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    for entry in json.loads(Path(runs_file).read_text()):
        entry = {"argv": entry} if isinstance(entry, list) else entry
        stop = entry.get("interrupt_at") or entry.get("kill_at")
        original = interrupt_at(stop, kill="kill_at" in entry) if stop else None
        try:
            code = main(entry["argv"] + local_rank)
        except Interrupted:
            code = 0
        finally:
            if original is not None:
                Trainer.checkpoint = original
        if code:
            sys.exit(code)
