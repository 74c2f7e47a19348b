"""The fine-tuning recipe and gate (no Redis, no Label Studio), and ``hih-assist finetune``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import LFPW_TEST, tiny_checkpoint

from active_learning.cli_finetune import register
from active_learning.finetune import (
    FinetuneDataError,
    FinetuneOptions,
    _gate,
    check_records_300w,
    finetune,
    split_holdout,
)
from hih_settings import Settings
from model.checkpoint import load_checkpoint
from model.readers import FaceRecord, load_300w_folder

torch.set_num_threads(1)
QUICK = FinetuneOptions(epochs=4, batch_size=8, lr=1e-2, device="cpu", threads=1)


def fake_records(n: int, per_image: int = 1) -> list[FaceRecord]:
    pts = np.zeros((68, 2), np.float32)
    return [FaceRecord(Path(f"img{i // per_image}.jpg"), pts, None, "300w_68") for i in range(n)]


def test_split_holdout_is_by_image_stable_and_sized():
    records = fake_records(30, per_image=2)  # 15 images
    train, held = split_holdout(records, 0.2)
    assert len(held) == 6 and len(train) == 24  # 3 images of 2 faces
    assert {r.image_path for r in train}.isdisjoint({r.image_path for r in held})
    again, held_again = split_holdout(list(reversed(records)), 0.2)
    assert {r.image_path for r in held_again} == {r.image_path for r in held}
    # a growing project keeps most of its held-out images held out
    bigger = split_holdout(fake_records(60, per_image=2), 0.2)[1]
    assert len({r.image_path for r in held} & {r.image_path for r in bigger}) >= 2


def test_split_holdout_needs_enough_faces():
    assert [len(x) for x in split_holdout(fake_records(3), 0.2)] == [2, 1]
    with pytest.raises(FinetuneDataError, match="need at least 2 annotated images"):
        split_holdout(fake_records(1), 0.2)
    with pytest.raises(FinetuneDataError, match="left to train on"):
        split_holdout(fake_records(2), 0.2)


def test_group_attribute_keeps_faces_together():
    records = fake_records(10)
    for i, r in enumerate(records):
        r.attributes = {"group": f"task-{i // 5}"}
    train, held = split_holdout(records, 0.2)
    assert len(held) == 5 and len(train) == 5


def test_gate_rules():
    opts = FinetuneOptions()
    assert _gate(opts, 0.10, 0.08, None, None, False)[0]
    assert _gate(opts, 0.10, 0.10, None, None, False)[0]  # not worse is enough
    ok, reason = _gate(opts, 0.10, 0.1001, None, None, False)
    assert not ok and "held-out NME got worse: 10.00% -> 10.01%" in reason
    ok, reason = _gate(opts, 0.10, 0.05, 0.04, 0.061, False)
    assert not ok and "300-W check NME collapsed" in reason
    assert _gate(opts, 0.10, 0.05, 0.04, 0.059, False)[0]  # worse, but not collapsed
    assert not _gate(opts, 0.10, float("inf"), None, None, True)[0]
    assert _gate(FinetuneOptions(tolerance=0.05), 0.10, 0.104, None, None, False)[0]


@pytest.fixture(scope="module")
def faces(data_dir):
    return load_300w_folder(data_dir / LFPW_TEST)[:8]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


@pytest.mark.data
def test_finetune_improves_held_out_faces_and_writes_a_checkpoint(faces, base, tmp_path, data_dir):
    seen = []
    result = finetune(faces, base, tmp_path / "out", QUICK, check_records=check_records_300w(data_dir, 4),
                      progress=seen.append, meta={"project": 3})
    assert result.accepted, result.reason
    assert result.holdout_nme_after < result.holdout_nme_before
    assert (result.n_train, result.n_holdout, result.n_check, result.epochs) == (6, 2, 4, 4)
    assert result.check_nme_before is not None and result.check_nme_after is not None
    model, meta = load_checkpoint(result.checkpoint)
    assert meta["parent"] == "tiny-base" and meta["project"] == 3
    assert meta["finetune"]["accepted"] and meta["finetune"]["options"]["lr"] == QUICK.lr
    assert meta["scheme"] == "300w_68"
    epochs = [v["epoch"] for v in seen if v["stage"] == "training" and v.get("epoch")]
    assert epochs == [1, 2, 3, 4]
    assert all(v.get("holdout_nme") is not None for v in seen if v["stage"] == "training")
    assert seen[-1]["stage"] == "done" and seen[-1]["accepted"]


@pytest.fixture(scope="module")
def trained(data_dir, base, tmp_path_factory):
    """The tiny model trained a little on 24 faces: about 20% NME, good enough to be made worse."""
    faces = load_300w_folder(data_dir / LFPW_TEST)[:24]
    opts = FinetuneOptions(epochs=15, batch_size=8, lr=1e-2, device="cpu", threads=1)
    result = finetune(faces, base, tmp_path_factory.mktemp("trained") / "ckpt", opts)
    assert result.accepted and result.holdout_nme_after < 0.3
    return Path(result.checkpoint)


@pytest.mark.data
def test_training_on_wrong_points_is_rejected_and_writes_nothing(faces, trained, tmp_path):
    train, held = split_holdout(faces, 0.2)
    wrong = []
    for r in train:  # labels upside down: the chin where the brows are
        pts = r.points.copy()
        pts[:, 1] = pts[:, 1].min() + pts[:, 1].max() - pts[:, 1]
        wrong.append(FaceRecord(r.image_path, pts, None, r.scheme))
    result = finetune(wrong, trained, tmp_path / "bad", QUICK, holdout=held)
    assert not result.accepted and "held-out NME got worse" in result.reason
    assert result.checkpoint is None and not (tmp_path / "bad").exists()


@pytest.mark.data
def test_check_records_come_from_300w_validation(data_dir, tmp_path):
    recs = check_records_300w(data_dir, 5)
    assert len(recs) == 5 and all("300w/test/lfpw" in str(r.image_path) for r in recs)
    assert check_records_300w(tmp_path, 5) == [] and check_records_300w(None, 5) == []


@pytest.mark.data
def test_cli_finetune_runs_the_recipe_and_gate(faces, base, tmp_path, monkeypatch):
    data = tmp_path / "faces"
    data.mkdir()
    for r in faces:  # links, not copies: the data stays in ../shared
        (data / r.image_path.name).symlink_to(r.image_path)
        (data / (r.image_path.stem + ".pts")).symlink_to(r.image_path.with_suffix(".pts"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "finetune", "--init", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "4",
        "--lr", "0.01", "--batch-size", "8", "--check", "0", "--replay", "0", "--device", "cpu",
        "--threads", "1",
    ])
    assert args.func(args, Settings()) == 0
    report = json.loads((tmp_path / "o" / "finetune.json").read_text())
    assert report["accepted"] and report["n_holdout"] == 2 and report["n_check"] == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    bad = parser.parse_args(["finetune", "--init", str(tmp_path), "--data", str(data), "--out", "x"])
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        bad.func(bad, Settings())
