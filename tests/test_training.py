"""A tiny model overfits a handful of real faces: loss and NME fall; resume continues where it stopped."""

import json

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.evaluate import evaluate_crops
from model.readers import load_300w_folder
from model.schemes import get_scheme
from model.train import TrainOptions, train

pytestmark = [pytest.mark.data, pytest.mark.slow]


@pytest.fixture(scope="module")
def few_faces(data_dir):
    return load_300w_folder([data_dir / "300w" / "train" / "lfpw"])[:8]


def test_tiny_model_overfits_a_handful_of_faces(few_faces, tmp_path):
    torch.set_num_threads(1)
    scheme = get_scheme(68)
    opts = TrainOptions(config="hih_tiny", epochs=60, batch_size=2, lr=3e-3, warmup_epochs=2, workers=0,
                        seed=3, augment=False)
    untrained = TrainOptions(**{**opts.__dict__, "epochs": 1, "lr": 1e-9})
    before = train(few_faces, few_faces, tmp_path / "untrained", untrained, progress=False)["history"][0]["val_nme"]
    summary = train(few_faces, few_faces, tmp_path / "run", opts, progress=False)
    hist = summary["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] - 1.0  # soft-CE has an entropy floor of about 4 nats
    after = hist[-1]["val_nme"]
    assert after < 0.5 * before and after < 0.08, (before, after)
    model, meta = load_checkpoint(tmp_path / "run" / "last")
    assert meta["scheme"] == "300w_68" and meta["epoch"] == 60
    again = evaluate_crops(model, few_faces, scheme)
    assert again["nme"] == pytest.approx(after, rel=1e-4)


def test_resume_continues_from_the_saved_state(few_faces, tmp_path):
    torch.set_num_threads(1)
    opts = TrainOptions(config="hih_tiny", epochs=2, batch_size=4, max_steps_per_epoch=2, workers=0, seed=1)
    out = tmp_path / "run"
    train(few_faces, few_faces[:2], out, opts, progress=False)
    longer = TrainOptions(**{**opts.__dict__, "epochs": 3})
    summary = train(few_faces, few_faces[:2], out, longer, resume=True, progress=False)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == 3
    assert np.isfinite(summary["best_val_nme"])
