"""Every CLI ends a user's mistake, a file the system refused and Ctrl-C on one line, without a traceback: exit 2
for the first two, 130 for Ctrl-C with how to go on."""

import pytest

import experiment.cli
import finetune.cli
import pretrain.cli
from common.errors import ConfigError

CLIS = [
    (finetune.cli, "_run", ["run", "--task", "ad", "--manifest", "m.csv"]),
    (experiment.cli, "run_experiment", ["--config", "configs/experiment/quickstart.yaml"]),
    (pretrain.cli, "run", ["--config", "configs/pretrain/quickstart.yaml"]),
]


@pytest.mark.parametrize("module, inner, argv", CLIS, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize(
    "raised, code, line",
    [
        (ConfigError("train.lr must be > 0"), 2, "train.lr must be > 0"),
        (PermissionError(13, "Permission denied", "/data/m.csv"), 2, "/data/m.csv: Permission denied"),
        (KeyboardInterrupt(), 130, "interrupted; rerun"),
    ],
    ids=["config", "oserror", "interrupt"],
)
def test_a_cli_ends_on_one_line(module, inner, argv, raised, code, line, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(module, inner, fail)
    if module is experiment.cli:
        monkeypatch.setattr(module, "load_experiment_config", lambda *a, **k: None)
    if module is finetune.cli:  # the dispatch table is built per call from the module's functions
        monkeypatch.setattr(module, "_run", fail)
    assert module.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0] and "Traceback" not in err[0], err


def test_synth_and_pack_end_an_oserror_on_one_line(monkeypatch, capsys, tmp_path):
    import pretrain.pack
    import synth.cli

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x.nii.gz"))

    monkeypatch.setattr(synth.cli, "run", full)
    assert synth.cli.main(["generate"]) == 2
    monkeypatch.setattr(pretrain.pack, "pack_manifest", full)
    argv = ["--manifest", "m.csv", "--out", str(tmp_path / "p"), "--spacing", "4", "--shape", "8", "8", "8"]
    assert pretrain.pack.main([*argv, "--intensity", "percentile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("x.nii.gz: No space left on device" in line for line in err), err
