"""Per-epoch progress of full and LoRA fine-tuning: one bar step per epoch with the validation score early stopping
follows, shown on a terminal only."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from common.tb import progress
from finetune.modes import full
from tests.finetune.test_full_loop import classification_fold, config, scripted_validation


def test_each_epoch_advances_the_bar_with_its_validation_score(monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.625, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])
    shown = io.StringIO()
    bars = []

    def bar(**kwargs):  # the real bar, drawn into a string as on a terminal
        bars.append(tqdm(file=shown, mininterval=0, miniters=1, **{**kwargs, "disable": False, "leave": True}))
        return bars[-1]

    monkeypatch.setattr(full, "progress", bar)
    _, _, info = full.fit_predict_full(classification_fold(), *config(patience=3))
    assert bars[0].n == info["epochs_run"] == 6 and bars[0].total == 10  # stopped early: 6 of 10 epochs
    text = shown.getvalue()
    assert "fold 0" in text and "val AUC 0.625" in text and "val AUC 0.900" in text


def test_the_bar_stays_off_where_stderr_is_not_a_terminal():
    assert progress(total=3, disable=None).disable  # pytest captures stderr: no terminal
    assert not progress(total=3, disable=False).disable
