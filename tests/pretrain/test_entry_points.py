"""``python -m pretrain`` and the script ``pretrain/main.py`` (what ``deepspeed pretrain/main.py`` runs) are the
same command, and neither depends on the working folder; their stdout carries only what the command prints
(DeepSpeed's own logging goes to stderr)."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import config_values, load_config
from pretrain.config import PretrainConfig

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
    assert done.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'absent.yaml'}: config file not found"
    assert done.stdout == ""  # DeepSpeed's logging (the accelerator it picked) is on stderr


def test_print_config_on_stdout_is_the_config_alone(tmp_path):
    recipe = REPO / "configs" / "pretrain" / "quickstart.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", str(recipe), "--corpus", "video", "--print-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / "printed.yaml").write_text(done.stdout)
    expected = config_values(load_config(PretrainConfig, recipe, ["corpus=video"]))
    assert config_values(load_config(PretrainConfig, tmp_path / "printed.yaml")) == expected
    assert not (tmp_path / "runs").exists()  # printed, not run
