"""``python -m pretrain`` and the script ``pretrain/main.py`` (what ``deepspeed pretrain/main.py`` runs) are the
same command, and neither depends on the working folder."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("entry", [["-m", "pretrain"], [str(REPO / "pretrain" / "main.py")]])
def test_module_and_script_run_the_same_cli(entry, tmp_path):
    done = subprocess.run(
        [sys.executable, *entry, "--config", str(tmp_path / "absent.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "absent.yaml: config file not found" in done.stderr
