"""Every CLI speaks the same words: ``--version``; ``--print-config`` (YAML that reads back, nothing run);
``--out``; a user's mistake, a file the system refused and Ctrl-C end on one line without a traceback: ``error:``
and exit 2 for the first two, 130 for Ctrl-C with how to go on."""

import sys
from importlib import metadata

import pytest
import yaml

import experiment.cli
import finetune.cli
import pretrain.cli
import pretrain.pack
import synth.cli
import synth.ldm.cli
from common.errors import ConfigError

CLIS = [
    (finetune.cli, "_run", ["run", "--task", "ad", "--manifest", "m.csv"]),
    (experiment.cli, "run_experiment", ["--config", "configs/experiment/quickstart.yaml"]),
    (pretrain.cli, "run", ["--config", "configs/pretrain/quickstart.yaml"]),
    (synth.cli, "run", ["generate"]),
    (synth.ldm.cli, "run_ldm_train", ["ldm-train", "--out", "runs/ldm"]),
    (pretrain.pack, "pack_manifest", "--manifest m.csv --out p --spacing 4 --shape 8 8 8 --intensity none".split()),
]


@pytest.mark.parametrize("module, inner, argv", CLIS, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize(
    "raised, code, line",
    [
        (ConfigError("train.lr must be > 0"), 2, "error: train.lr must be > 0"),
        (ConfigError("m.csv: bad rows:\n  line 3\n  line 9"), 2, "error: m.csv: bad rows: line 3 line 9"),
        (PermissionError(13, "Permission denied", "/data/m.csv"), 2, "error: /data/m.csv: Permission denied"),
        (KeyboardInterrupt(), 130, "interrupted; "),
    ],
    ids=["config", "lines", "oserror", "interrupt"],
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
    assert len(err) == 1 and err[0].startswith(line), err
    assert code == 2 or "rerun" in err[0]  # Ctrl-C: how to go on


MAINS = {
    "synth": synth.cli.main,
    "synth.ldm": synth.ldm.cli.main,
    "pretrain": pretrain.cli.main,
    "pretrain.pack": pretrain.pack.main,
    "finetune": finetune.cli.main,
    "experiment": experiment.cli.main,
}


@pytest.mark.parametrize("name", MAINS)
def test_every_cli_says_its_version(name, capsys):
    with pytest.raises(SystemExit) as stop:
        MAINS[name](["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"neurotransfer {metadata.version('neurotransfer')}\n"


@pytest.mark.parametrize("name", MAINS)
def test_every_cli_ends_a_command_line_mistake_on_one_error_line(name, capsys):
    assert MAINS[name](["--no-such-option"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith("--help)"), err


# (main, a command that would run, where it would start running): --print-config must print and stop before it
PRINTS = {
    "synth generate": (
        synth.cli.main,
        ["generate", "--out", "{tmp}/s", "--n", "2", "--spacing", "4"],
        "synth.cohort.generate",
    ),
    "synth calibrate": (
        synth.cli.main,
        ["calibrate", "--spacing", "4", "contrast=random"],
        "synth.calibrate.calibrate",
    ),
    "synth ldm-train": (
        synth.cli.main,
        ["ldm-train", "--out", "{tmp}/l", "--config", "configs/synth/ldm_quickstart.yaml"],
        "synth.ldm.train.train_ldm",
    ),
    "pretrain": (
        pretrain.cli.main,
        ["--config", "configs/pretrain/quickstart.yaml", "train.steps=7"],
        "pretrain.cli.run",
    ),
    "finetune run": (
        finetune.cli.main,
        ["run", "--task", "ad", "--manifest", "m.csv", "train.epochs=3"],
        "finetune.cli.run_cell",
    ),
    "finetune probe": (
        finetune.cli.main,
        ["probe", "--init", "scratch", "--manifest", "m.csv"],
        "finetune.cli.run_probe",
    ),
    "experiment": (
        experiment.cli.main,
        ["--config", "configs/experiment/quickstart.yaml", "--out", "{tmp}/e"],
        "experiment.cli.run_experiment",
    ),
}


def _never_runs(monkeypatch, dotted: str) -> None:
    module, _, name = dotted.rpartition(".")

    def ran(*args, **kwargs):
        raise AssertionError(f"--print-config ran {dotted}")

    monkeypatch.setattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, ran)


@pytest.mark.parametrize("name", PRINTS)
def test_print_config_prints_yaml_that_reads_back_as_the_same_config_and_runs_nothing(
    name, tmp_path, capsys, monkeypatch
):
    main, argv, runner = PRINTS[name]
    _never_runs(monkeypatch, runner)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert isinstance(yaml.safe_load(printed), dict)
    (tmp_path / "printed.yaml").write_text(printed)
    given = argv.index("--config") if "--config" in argv else len(argv)
    again = [*argv[:given], *argv[given + 2 :], "--config", str(tmp_path / "printed.yaml"), "--print-config"]
    assert main(again) == 0
    assert capsys.readouterr().out == printed  # the file alone says everything the flags and overrides said


@pytest.mark.parametrize(
    "main, argv, settings",
    [
        (
            pretrain.pack.main,
            ["--manifest", "m.csv", "--out", "p", "--spacing", "4", "--shape", "8", "8", "8", "--intensity", "none"],
            {"out": "p", "dtype": "float16", "preprocess": {"spacing": [4.0] * 3, "shape": [8] * 3}},
        ),
        (
            synth.cli.main,
            [
                "ldm-sample",
                "--model",
                "m",
                "--n",
                "3",
                "--out",
                "o",
                "--age",
                "70",
                "--device",
                "cpu",
                "--precision",
                "fp32",
            ],
            {"n": 3, "out": "o", "covariates": {"age": 70.0}, "device": "cpu", "precision": "fp32"},
        ),
    ],
    ids=["pretrain.pack", "synth ldm-sample"],
)
def test_print_config_of_a_command_without_a_config_file_prints_its_settings(main, argv, settings, capsys):
    assert main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)

    def within(want, got):
        return all(within(v, got[k]) for k, v in want.items()) if isinstance(want, dict) else want == got

    assert within(settings, printed), printed


def test_output_is_the_deprecated_spelling_of_out(capsys):
    assert pretrain.cli.parse_args(["--output", "runs/a"]).out == "runs/a"
    assert capsys.readouterr().err.strip().splitlines() == ["warning: --output is deprecated; use --out"]
    assert pretrain.cli.parse_args(["--out", "runs/b"]).out == "runs/b"
    assert capsys.readouterr().err == ""


def test_a_distributed_run_names_the_rank_after_the_message(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise ConfigError("data.batch_size must be > 0")

    monkeypatch.setattr(pretrain.cli, "run", fail)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert pretrain.cli.main(["--config", "configs/pretrain/quickstart.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: data.batch_size must be > 0 (rank 1)"]
