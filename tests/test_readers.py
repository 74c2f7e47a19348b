"""Annotation readers: .pts, 300-W folders, 300-VW, WFLW text, COCO JSON.

All points are checked in 0-based pixel-centre coordinates (x right, y down; top-left pixel centre (0, 0)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.readers import (
    FaceRecord,
    load_300vw_folder,
    load_300w_folder,
    read_coco_keypoints,
    read_pts,
    read_wflw_annotations,
    write_pts,
)


def _pts_text(points: list[tuple[float, float]], n: int | None = None) -> str:
    body = "\n".join(f"{x} {y}" for x, y in points)
    return f"version: 1\nn_points:  {len(points) if n is None else n}\n{{\n{body}\n}}\n"


def _make_face(folder: Path, stem: str, k: int = 68, suffix: str = ".jpg") -> np.ndarray:
    """Write an (empty) image file and a .pts with k points; returns the 0-based points."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}{suffix}").write_bytes(b"")
    pts = np.stack([np.arange(k) + 0.25, np.arange(k) * 2 + 0.5], axis=1)
    write_pts(folder / f"{stem}.pts", pts)
    return pts


# ------------------------------------------------------------------------------------------ .pts


def test_read_pts_subtracts_one(tmp_path: Path) -> None:
    p = tmp_path / "a.pts"
    p.write_text(_pts_text([(1.0, 1.0), (10.5, 20.25), (3, 4)]))
    np.testing.assert_allclose(read_pts(p), [[0, 0], [9.5, 19.25], [2, 3]])


def test_read_pts_tolerates_crlf_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.pts"
    p.write_bytes(b"version: 1.0\r\nn_points: 2\r\n{\r\n1 2\r\n3e0 4.5\r\n}\r\n\r\n")
    np.testing.assert_allclose(read_pts(p), [[0, 1], [2, 3.5]])


def test_write_read_round_trip(tmp_path: Path) -> None:
    pts = np.random.default_rng(1).uniform(-3, 500, size=(68, 2))
    write_pts(tmp_path / "r.pts", pts)
    np.testing.assert_allclose(read_pts(tmp_path / "r.pts"), pts, atol=1e-6)
    assert (tmp_path / "r.pts").read_text().splitlines()[:3] == ["version: 1", "n_points: 68", "{"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "not a .pts file"),
        ("hello world\n", "not a .pts file"),
        ("version: 1\nn_points: x\n{\n1 2\n}\n", "n_points"),
        ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", "3 but the file holds 2"),
        ("version: 1\nn_points: 2\n{\n1 2\nfoo bar\n}\n", "point 1"),
        ("version: 1\nn_points: 1\n{\n1 2 3\n}\n", "point 0"),
        ("version: 1\nn_points: 1\n1 2\n3 4\n", "enclosed"),
        ("version: 1\nn_points: 1\n{\nnan 2\n}\n", "point 0"),
    ],
)
def test_read_pts_rejects_bad_content(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "bad.pts"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_pts(p)
    assert "bad.pts" in str(info.value)


def test_read_pts_rejects_binary(tmp_path: Path) -> None:
    p = tmp_path / "bin.pts"
    p.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(ValueError, match="bin.pts"):
        read_pts(p)


def test_write_pts_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        write_pts(tmp_path / "x.pts", np.zeros((68, 3)))


# ------------------------------------------------------------------------------------------ 300-W folders


def test_load_300w_folder_synthetic(tmp_path: Path) -> None:
    b = _make_face(tmp_path / "sub" / "deep", "b", suffix=".png")
    a = _make_face(tmp_path, "a")
    (tmp_path / "unannotated.jpg").write_bytes(b"")
    write_pts(tmp_path / "orphan.pts", np.zeros((68, 2)))  # no image: skipped
    recs = load_300w_folder(tmp_path)
    assert [r.image_path.name for r in recs] == ["a.jpg", "b.png"]
    np.testing.assert_allclose(recs[0].points, a, atol=1e-5)
    np.testing.assert_allclose(recs[1].points, b, atol=1e-5)
    assert recs[0].points.dtype == np.float32 and recs[0].points.shape == (68, 2)
    assert recs[0].visible is None and recs[0].scheme == "300w_68"


def test_load_300w_folder_multi_face_naming(tmp_path: Path) -> None:
    _make_face(tmp_path, "img")
    (tmp_path / "img.pts").rename(tmp_path / "img_1.pts")
    _make_face(tmp_path, "tmp")
    (tmp_path / "tmp.jpg").unlink()
    (tmp_path / "tmp.pts").rename(tmp_path / "img_2.pts")
    recs = load_300w_folder(tmp_path)
    assert [r.image_path.name for r in recs] == ["img.jpg", "img.jpg"]


def test_load_300w_folder_several_folders(tmp_path: Path) -> None:
    _make_face(tmp_path / "x", "z")
    _make_face(tmp_path / "y", "a")
    recs = load_300w_folder([tmp_path / "y", tmp_path / "x"])
    assert [r.image_path.parent.name for r in recs] == ["x", "y"]  # sorted by path


def test_load_300w_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "only.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=f"no faces found in {tmp_path}"):
        load_300w_folder(tmp_path)
    with pytest.raises(ValueError, match="no faces found in"):
        load_300w_folder(tmp_path / "missing")


def test_load_300w_folder_wrong_count(tmp_path: Path) -> None:
    _make_face(tmp_path, "ok")
    _make_face(tmp_path, "short", k=67)
    with pytest.raises(ValueError, match=r"short\.pts: 67 points, expected 68"):
        load_300w_folder(tmp_path)
    with pytest.raises(ValueError, match=r"short\.pts"):  # 67 is no known scheme either
        load_300w_folder(tmp_path, expected_points=None)


def test_load_300w_folder_any_scheme(tmp_path: Path) -> None:
    _make_face(tmp_path, "w", k=98)
    assert load_300w_folder(tmp_path, expected_points=None)[0].scheme == "wflw_98"


def test_load_300w_folder_garbage_pts(tmp_path: Path) -> None:
    _make_face(tmp_path, "g")
    (tmp_path / "g.pts").write_text("garbage")
    with pytest.raises(ValueError, match=r"g\.pts"):
        load_300w_folder(tmp_path)


@pytest.mark.data
def test_load_300w_train(data_dir: Path) -> None:
    recs = load_300w_folder(data_dir / "300w" / "train")
    assert len(recs) == 2012
    assert [r.image_path for r in recs] == sorted(r.image_path for r in recs)
    assert all(r.image_path.is_file() and r.points.shape == (68, 2) for r in recs)
    # the first AFW file's first point is "96.598615 130.627132" (1-based)
    first = next(r for r in recs if r.image_path.name == "1051618982_1.jpg")
    np.testing.assert_allclose(first.points[0], [95.598615, 129.627132], atol=1e-4)


@pytest.mark.data
def test_load_300w_points_inside_crops(data_dir: Path) -> None:
    from PIL import Image

    recs = load_300w_folder(data_dir / "300w" / "test" / "lfpw")
    assert len(recs) == 224
    for r in recs[:20]:
        w, h = Image.open(r.image_path).size
        assert (
            (r.points >= -0.5).all()
            and (r.points[:, 0] <= w - 0.5).all()
            and (r.points[:, 1] <= h - 0.5).all()
        )


# ------------------------------------------------------------------------------------------ WFLW text


def _wflw_line(rng: np.random.Generator, rel: str, attrs: tuple[int, ...]) -> tuple[str, np.ndarray]:
    pts = rng.uniform(10, 200, size=(98, 2))
    nums = " ".join(f"{v:.6f}" for v in pts.ravel())
    return f"{nums} 5 6 210 220 {' '.join(map(str, attrs))} {rel}", pts


def test_read_wflw_annotations(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    l1, p1 = _wflw_line(rng, "51--Dresses/51_Dresses_1.jpg", (0, 1, 0, 0, 1, 0))
    l2, p2 = _wflw_line(rng, "7--Cheering/7_Cheering_2.jpg", (1, 0, 0, 1, 0, 1))
    txt = tmp_path / "list_98pt_rect_attr_test.txt"
    txt.write_text(f"{l1}\n\n{l2}\n")
    recs = read_wflw_annotations(txt, tmp_path / "images")
    assert len(recs) == 2
    r = recs[0]
    assert r.scheme == "wflw_98" and r.points.shape == (98, 2) and r.points.dtype == np.float32
    np.testing.assert_allclose(r.points, p1, atol=1e-4)  # WFLW values are used as they are
    np.testing.assert_allclose(recs[1].points, p2, atol=1e-4)
    assert r.image_path == tmp_path / "images" / "51--Dresses" / "51_Dresses_1.jpg"
    assert r.box == (5.0, 6.0, 210.0, 220.0)
    assert r.attributes == {
        "pose": 0,
        "expression": 1,
        "illumination": 0,
        "make_up": 0,
        "occlusion": 1,
        "blur": 0,
    }
    assert recs[1].attributes["blur"] == 1


def test_read_wflw_annotations_bad_line(tmp_path: Path) -> None:
    txt = tmp_path / "bad.txt"
    txt.write_text("1 2 3 img.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1"):
        read_wflw_annotations(txt, tmp_path)
    txt.write_text(" ".join(["x"] * 206) + " img.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: the first 206"):
        read_wflw_annotations(txt, tmp_path)


# ------------------------------------------------------------------------------------------ COCO JSON


def _coco(tmp_path: Path, keypoints: list[float], bbox: list[float] | None = None) -> Path:
    ann = {"id": 7, "image_id": 1, "keypoints": keypoints}
    if bbox is not None:
        ann["bbox"] = bbox
    data = {"images": [{"id": 1, "file_name": "im.jpg", "width": 50, "height": 40}], "annotations": [ann]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_read_coco_synthetic_conventions(tmp_path: Path) -> None:
    kp = []
    for i in range(68):
        kp += [float(i + 1), float(2 * i + 1), 1]
    path = _coco(tmp_path, kp, bbox=[1, 1, 10, 20])
    (r,) = read_coco_keypoints(path)  # 68 points: a 300-W source, 1-based
    assert r.scheme == "300w_68" and r.image_path == tmp_path / "im.jpg" and r.visible is None
    np.testing.assert_allclose(r.points[:3], [[0, 0], [1, 2], [2, 4]])
    assert r.box == (0.0, 0.0, 10.0, 20.0)
    (r0,) = read_coco_keypoints(path, image_root=tmp_path / "other", one_based=False)
    np.testing.assert_allclose(r0.points[:2], [[1, 1], [2, 3]])
    assert r0.image_path == tmp_path / "other" / "im.jpg"


def test_read_coco_visibility(tmp_path: Path) -> None:
    kp = []
    for i in range(29):
        kp += [10.0 + i, 20.0, [2, 1, 0][i % 3]]
    (r,) = read_coco_keypoints(_coco(tmp_path, kp))
    assert r.scheme == "cofw_29"
    np.testing.assert_array_equal(r.visible, [i % 3 == 0 for i in range(29)])
    np.testing.assert_array_equal(r.attributes["coco_v"][:3], [2, 1, 0])


@pytest.mark.parametrize(
    ("keypoints", "match"),
    [([1.0, 2.0], "keypoint values"), ([1.0, 2.0, 1.0] * 5, "unknown landmark scheme")],
)
def test_read_coco_bad(tmp_path: Path, keypoints: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_coco_keypoints(_coco(tmp_path, keypoints))


def test_read_coco_not_coco(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="not a COCO keypoint file"):
        read_coco_keypoints(p)


FIXTURES = [
    ("wflw/test_wflw.json", 4, "wflw_98"),
    ("cofw/test_cofw.json", 2, "cofw_29"),
    ("300w/test_300w.json", 2, "300w_68"),
    ("300vw/anno_300vw.json", 3, "300w_68"),
]


@pytest.mark.data
@pytest.mark.parametrize(("rel", "count", "scheme"), FIXTURES)
def test_read_coco_fixtures(data_dir: Path, rel: str, count: int, scheme: str) -> None:
    recs = read_coco_keypoints(data_dir / "fixtures" / rel)
    assert len(recs) == count
    for r in recs:
        assert isinstance(r, FaceRecord) and r.scheme == scheme and r.image_path.is_file()
        w, h = r.attributes["width"], r.attributes["height"]
        assert (r.points >= 0).all() and (r.points[:, 0] < w).all() and (r.points[:, 1] < h).all()
        # (boxes are not checked: one WFLW fixture box is 48 px tall for a 111 px tall face)


@pytest.mark.data
def test_cofw_fixture_occlusion(data_dir: Path) -> None:
    recs = read_coco_keypoints(data_dir / "fixtures" / "cofw" / "test_cofw.json")
    # the first face (Einstein, tongue out) has the mouth points 22-27 marked occluded
    np.testing.assert_array_equal(np.flatnonzero(~recs[0].visible), np.arange(22, 28))
    # outer eye corners 8 (image left) and 9 (image right) are at eye height, the pupils between them
    p = recs[0].points
    assert p[8, 0] < p[16, 0] < p[17, 0] < p[9, 0]
    assert abs(p[8, 1] - p[9, 1]) < 0.1 * abs(p[9, 0] - p[8, 0])


@pytest.mark.data
def test_300vw_json_is_1_based_like_its_pts(data_dir: Path) -> None:
    """The evidence for the COCO convention: the 300-VW JSON repeats the 1-based .pts values."""
    root = data_dir / "fixtures" / "300vw"
    from_json = read_coco_keypoints(root / "anno_300vw.json")
    from_pts = load_300vw_folder(root, broken_frames={"401": [731]})  # the JSON leaves the broken frame out
    assert [r.image_path for r in from_json] == [r.image_path for r in from_pts]
    for a, b in zip(from_json, from_pts, strict=True):
        np.testing.assert_allclose(a.points, b.points, atol=1e-4)
    raw = json.loads((root / "anno_300vw.json").read_text())["annotations"][0]["keypoints"]
    np.testing.assert_allclose(from_json[0].points[0], np.array(raw[:2]) - 1, atol=1e-4)


# ------------------------------------------------------------------------------------------ 300-VW


@pytest.mark.data
def test_load_300vw_fixture_drops_broken_frames(data_dir: Path, tmp_path: Path) -> None:
    root = data_dir / "fixtures" / "300vw"
    with pytest.raises(ValueError, match="never loads pickles"):
        load_300vw_folder(root, broken_frames=root / "broken_frames.npy")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"401": [731, 722]}))  # the fixture .npy lists 401/731 as broken
    recs = load_300vw_folder(root, broken_frames=broken)
    assert [(r.attributes["video"], r.attributes["frame"]) for r in recs] == [
        ("001", 6),
        ("001", 9),
        ("401", 732),
    ]
    assert all(r.image_path.is_file() and r.scheme == "300w_68" for r in recs)
    assert len(load_300vw_folder(root)) == 4  # no broken_frames.json there: every frame


def test_load_300vw_synthetic(tmp_path: Path) -> None:
    for video, frame in (("002", "000001"), ("002", "000002"), ("010", "000005")):
        (tmp_path / video / "imgs").mkdir(parents=True, exist_ok=True)
        (tmp_path / video / "annot").mkdir(parents=True, exist_ok=True)
        (tmp_path / video / "imgs" / f"{frame}.jpg").write_bytes(b"")
        write_pts(tmp_path / video / "annot" / f"{frame}.pts", np.full((68, 2), 3.0))
    recs = load_300vw_folder(tmp_path, broken_frames={"002": [2]})
    assert [(r.attributes["video"], r.attributes["frame"]) for r in recs] == [("002", 1), ("010", 5)]
    np.testing.assert_allclose(recs[0].points, 3.0, atol=1e-5)
    with pytest.raises(ValueError, match="no faces found"):
        load_300vw_folder(tmp_path / "002" / "imgs")
