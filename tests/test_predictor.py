"""The image -> faces -> points path: inputs of every kind, given boxes, coordinates, and accuracy."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.detect import box_from_points, box_from_xywh
from model.image_io import ImageError, load_image
from model.metrics import nme
from model.predictor import Predictor
from model.readers import load_300w_folder


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    torch.set_num_threads(1)
    return Predictor.load(tiny_checkpoint, device="cpu", detector="haar")


def test_given_boxes_give_one_face_each_largest_first(tiny):
    img = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    faces = tiny.predict(img, boxes=[box_from_xywh(10, 10, 40, 40), box_from_xywh(100, 50, 90, 90)])
    assert [round(f.box.size) for f in faces] == [90, 40]
    for f in faces:
        assert f.points.shape == (68, 2) and np.isfinite(f.points).all()
        assert f.point_scores.shape == (68,) and ((f.point_scores > 0) & (f.point_scores <= 1)).all()
        assert 0 < f.score <= 1
    assert tiny.predict(img, boxes=[]) == []


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_any_pil_mode_is_accepted(tiny, mode):
    pil = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 90, 3), dtype=np.uint8))
    pil = pil.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.random.default_rng(1).integers(0, 65535, (80, 90))).astype(np.uint16))
    faces = tiny.predict(pil, boxes=[box_from_xywh(10, 10, 50, 50)])
    assert len(faces) == 1


def test_exif_rotation_is_applied_so_points_refer_to_the_displayed_image():
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[5, 50] = 255
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise when displayed
    Image.fromarray(arr).save(buf, format="JPEG", exif=exif, quality=100)
    shown = load_image(buf.getvalue())
    assert shown.shape[:2] == (60, 40)  # displayed: portrait
    y, x = np.unravel_index(shown[..., 0].argmax(), shown.shape[:2])
    assert (x, y) == (34, 50)  # (50, 5) rotated 90 degrees clockwise in a 40-wide display


@pytest.mark.parametrize("bad", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"])
def test_unreadable_images_raise_a_clear_error(bad):
    with pytest.raises(ImageError):
        load_image(bad)


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.data
def test_trained_model_on_real_faces(trained_weights, data_dir):
    torch.set_num_threads(1)
    records = load_300w_folder([data_dir / "300w" / "test_full" / "lfpw"])[:6]
    pred = Predictor.load(trained_weights, device="cpu")
    errors = []
    for rec in records:
        faces = pred.predict(rec.image_path, boxes=[box_from_points(rec.points)])
        errors.append(float(nme(faces[0].points, rec.points, pred.scheme)))
        detected = pred.predict(rec.image_path)
        assert detected, f"no face found in {rec.image_path}"
    assert np.mean(errors) < 0.08, errors
