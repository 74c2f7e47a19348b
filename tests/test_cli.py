"""The command line: bad input gives one clear line and exit status 2; good input gives JSON and overlays."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hih_cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "hih_cli.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_missing_image_is_one_line_error(tiny_checkpoint, capsys, tmp_path):
    code = main(["predict", str(tmp_path / "nope.jpg"), "--weights", str(tiny_checkpoint), "--detector", "haar"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "not found" in err[0]


def test_corrupt_image(tiny_checkpoint, capsys, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert main(["predict", str(bad), "--weights", str(tiny_checkpoint), "--detector", "haar"]) != 0
    assert "cannot read" in capsys.readouterr().err


def test_empty_folder(capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no faces found" in capsys.readouterr().err


def test_pts_with_wrong_point_count(capsys, tmp_path, tiny_checkpoint):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    (tmp_path / "a.pts").write_text("version: 1\nn_points: 3\n{\n1 1\n2 2\n3 3\n}\n")
    assert main(["evaluate", "--data", str(tmp_path), "--weights", str(tiny_checkpoint), "--json"]) == 2
    err = capsys.readouterr().err
    assert "a.pts" in err and "expected 68" in err


def test_checkpoint_of_another_scheme(capsys, tmp_path):
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.manual_seed(0)
    wflw = save_checkpoint(tmp_path / "wflw", HIHNet(get_config("hih_tiny", 98)), {"scheme": "wflw_98"})
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    (tmp_path / "a.pts").write_text("version: 1\nn_points: 68\n{\n" + "5 5\n" * 68 + "}\n")
    assert main(["evaluate", "--data", str(tmp_path), "--weights", str(wflw), "--json"]) == 2
    assert "wflw_98" in capsys.readouterr().err


def test_missing_checkpoint(capsys, tmp_path):
    assert main(["predict", "x.jpg", "--weights", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.data
def test_predict_writes_json_and_overlay(tiny_checkpoint, data_dir, tmp_path):
    image = sorted((data_dir / "300w" / "test_full" / "lfpw").glob("*.jpg"))[0]
    proc = run_cli("predict", str(image), "--weights", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--json",
                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out[0]["faces"] and len(out[0]["faces"][0]["points"]) == 68
    assert Path(out[0]["overlay"]).stat().st_size > 1000


@pytest.mark.data
def test_evaluate_json_and_outputs(tiny_checkpoint, data_dir, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted((data_dir / "300w" / "test" / "lfpw").glob("image_000[1-3].*")):
        (folder / p.name).symlink_to(p)
    proc = run_cli("evaluate", "--data", str(folder), "--weights", str(tiny_checkpoint), "--json", "--threads", "1",
                   "--per-image", str(tmp_path / "p.csv"), "--plot", str(tmp_path / "ced.png"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    for key in ("n", "nme", "fr", "auc", "missed", "ms_per_face"):
        assert key in summary
    assert summary["n"] == 3 and summary["missed"] == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "image,nme,uncertainty" and len(rows) == 4
    assert (tmp_path / "ced.png").stat().st_size > 1000
