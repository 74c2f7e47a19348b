"""The Label Studio harness against a real Label Studio 1.23 server, and the project's label_config.xml.

What these prove for the backend's own e2e tests: the label config is accepted by Label Studio, images can be
uploaded and fetched back with the legacy token, a personal access token (Bearer) and /data/local-files, an
annotation with a face box and keypoints linked by parentID round-trips, and an ML backend on 127.0.0.1 is
accepted (health, setup, webhook, predictions, training) with the harness's settings.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from .label_studio import LABEL_CONFIG, LabelStudioError, LabelStudioServer, StubMLBackend

LFPW = Path("300w") / "test_full" / "lfpw"


def _point_names() -> list[str]:
    return re.findall(r'<Label value="([^"]+)"', LABEL_CONFIG.read_text())[1:]  # [0] is "Face"


def _face_result(width: int, height: int, points: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """A face rectangle and one keypoint per point (pixel-centre coordinates, 0-based), as Label Studio
    stores them: percent of the image size, keypoints linked to the rectangle by parentID."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs) + 1, max(ys) + 1
    common = {"to_name": "image", "original_width": width, "original_height": height, "image_rotation": 0}
    result: list[dict[str, Any]] = [
        {
            "id": "face1",
            "type": "rectanglelabels",
            "from_name": "face",
            **common,
            "value": {
                "x": x0 / width * 100,
                "y": y0 / height * 100,
                "width": (x1 - x0) / width * 100,
                "height": (y1 - y0) / height * 100,
                "rotation": 0,
                "rectanglelabels": ["Face"],
            },
        }
    ]
    for i, (name, (x, y)) in enumerate(zip(_point_names(), points, strict=True)):
        result.append(
            {
                "id": f"kp{i}",
                "type": "keypointlabels",
                "from_name": "keypoints",
                "parentID": "face1",
                **common,
                "value": {
                    "x": (x + 0.5) / width * 100,
                    "y": (y + 0.5) / height * 100,
                    "width": 0.4,
                    "keypointlabels": [name],
                },
            }
        )
    return result


def _read_pts(path: Path) -> list[tuple[float, float]]:
    """300-W .pts (1-based pixel coordinates) -> 0-based pixel-centre coordinates."""
    text = path.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    return [(float(a) - 1, float(b) - 1) for a, b in (line.split() for line in body.strip().splitlines())]


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# ---------------------------------------------------------------- label_config.xml, no server needed


def test_label_config_parses_and_matches_the_300w_scheme() -> None:
    from label_studio_sdk.label_interface import LabelInterface

    from model.schemes import SCHEME_300W

    li = LabelInterface(LABEL_CONFIG.read_text())
    face = li.get_control("face")
    kps = li.get_control("keypoints")
    assert type(face).__name__ == "RectangleLabelsTag" and face.to_name == ["image"]
    assert face.labels == ["Face"]
    assert type(kps).__name__ == "KeyPointLabelsTag" and kps.to_name == ["image"]
    assert kps.labels == list(SCHEME_300W.point_names) == _point_names()
    assert li.get_object("image").value == "$image"

    # one colour per facial part (nose and mouth each split in two), never shared across the scheme's parts
    colours = dict(
        re.findall(r'<Label value="([^"]+)" background="(#[0-9a-f]{6})"', LABEL_CONFIG.read_text())
    )
    part_of = {SCHEME_300W.point_names[i]: part for part, idx in SCHEME_300W.parts.items() for i in idx}
    parts_by_colour: dict[str, set[str]] = {}
    for name in SCHEME_300W.point_names:
        parts_by_colour.setdefault(colours[name], set()).add(part_of[name])
    assert all(len(parts) == 1 for parts in parts_by_colour.values()), parts_by_colour
    assert len(parts_by_colour) == 9  # jaw, 2 brows, nose bridge/base, 2 eyes, outer/inner mouth


def test_missing_venv_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabelStudioError, match="make e2e-deps"):
        LabelStudioServer(tmp_path / "no-venv").start()


def test_a_failed_start_reports_the_server_log() -> None:
    if not LabelStudioServer.is_installed():
        pytest.skip("Label Studio is not installed: run `make e2e-deps`")
    server = LabelStudioServer(extra_env={"DJANGO_DB": "no-such-db"}, use_template=False, startup_timeout=120)
    with pytest.raises(
        LabelStudioError, match=r"exited with code \d+ during startup(.|\n)*KeyError: 'no-such-db'"
    ):
        server.start()
    assert server.log_path is not None and server.log_path.is_file()  # kept for a look
    shutil.rmtree(server.log_path.parent)


# ---------------------------------------------------------------- against the real server


def test_server_is_label_studio_1_23_and_accepts_the_legacy_token(label_studio: LabelStudioServer) -> None:
    assert str(label_studio.version()["release"]).startswith("1.23.")
    assert label_studio.current_user()["email"] == label_studio.username
    assert label_studio.session.get(f"{label_studio.url}/api/projects", timeout=10).status_code == 200


def test_project_tasks_and_annotation_round_trip(
    label_studio: LabelStudioServer, label_config_xml: str
) -> None:
    ls = label_studio
    pid = ls.create_project("harness: annotation round trip", label_config_xml)
    assert "KeyPointLabels" in ls.get_project(pid)["label_config"]
    task_ids = ls.import_tasks(
        pid, [{"data": {"image": "/data/upload/none/a.jpg"}}, {"image": "/data/upload/none/b.jpg"}]
    )
    assert len(task_ids) == 2
    assert sorted(t["id"] for t in ls.list_tasks(pid)) == sorted(task_ids)

    points = [(10.0 + 2 * i, 20.0 + i) for i in range(68)]
    result = _face_result(400, 300, points)
    ann = ls.create_annotation(task_ids[0], result)
    (back,) = ls.get_annotations(task_ids[0])
    assert back["id"] == ann["id"]
    by_id = {r["id"]: r for r in back["result"]}
    assert by_id["face1"]["value"]["rectanglelabels"] == ["Face"]
    kp = by_id["kp36"]
    assert kp["parentID"] == "face1" and kp["value"]["keypointlabels"] == ["right_eye_outer"]
    assert kp["value"]["x"] == pytest.approx((points[36][0] + 0.5) / 400 * 100)
    assert kp["value"]["y"] == pytest.approx((points[36][1] + 0.5) / 300 * 100)
    assert sum(r["type"] == "keypointlabels" for r in back["result"]) == 68
    assert ls.get_task(task_ids[0])["is_labeled"] is True


def test_personal_access_token_refreshes_to_a_bearer_token(label_studio: LabelStudioServer) -> None:
    refresh = label_studio.create_personal_access_token()
    access = label_studio.refresh_access_token(refresh)
    r = label_studio.download("/api/current-user/whoami", headers={"Authorization": f"Bearer {access}"})
    assert r.status_code == 200 and r.json()["email"] == label_studio.username
    assert label_studio.download("/api/current-user/whoami", headers={}).status_code == 401


@pytest.mark.data
def test_upload_face_images_and_fetch_them_back(
    label_studio: LabelStudioServer, label_config_xml: str, data_dir: Path
) -> None:
    lfpw = data_dir / LFPW
    images = sorted(lfpw.glob("*.jpg"))[:2] if lfpw.is_dir() else []
    if len(images) < 2:
        pytest.skip(f"needs two LFPW test images in {lfpw}")
    from PIL import Image

    ls = label_studio
    pid = ls.create_project("harness: uploaded faces", label_config_xml)
    task_ids = ls.upload_images(pid, images)
    assert len(task_ids) == 2
    tasks = {t["id"]: t for t in ls.list_tasks(pid)}
    assert sorted(tasks) == sorted(task_ids)
    for tid, path in zip(task_ids, images, strict=True):
        url = tasks[tid]["data"]["image"]
        assert url.startswith(f"/data/upload/{pid}/") and url.endswith(path.name)
        r = ls.download(url)
        assert r.status_code == 200 and r.content == path.read_bytes()

    # the same file with a personal access token (what the backend does with a JWT refresh token) ...
    access = ls.refresh_access_token(ls.create_personal_access_token())
    url0 = tasks[task_ids[0]]["data"]["image"]
    r = ls.download(url0, headers={"Authorization": f"Bearer {access}"})
    assert r.status_code == 200 and r.content == images[0].read_bytes()
    assert ls.download(url0, headers={}).status_code == 401

    # ... and through /data/local-files, once the folder is a Local Files storage of the project
    ls.add_local_storage(pid, lfpw)
    r = ls.download(ls.local_file_url(images[1]))
    assert r.status_code == 200 and r.content == images[1].read_bytes()

    # a ground-truth annotation on a real image round-trips
    width, height = Image.open(images[0]).size
    pts = images[0].with_suffix(".pts")
    points = _read_pts(pts) if pts.is_file() else [(width / 2, height / 2)] * 68
    ls.create_annotation(task_ids[0], _face_result(width, height, points))
    (back,) = ls.get_annotations(task_ids[0])
    assert {r["original_width"] for r in back["result"]} == {width}
    assert sum(r.get("parentID") == "face1" for r in back["result"]) == 68


def test_ml_backend_on_a_local_address_is_accepted(
    label_studio: LabelStudioServer, label_config_xml: str
) -> None:
    """ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false at work: a backend on 127.0.0.1 connects,
    gets its webhook, serves predictions and receives annotation and training events."""

    def predict(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        region = {
            "type": "keypointlabels",
            "from_name": "keypoints",
            "to_name": "image",
            "original_width": 100,
            "original_height": 100,
            "image_rotation": 0,
            "value": {"x": 50.0, "y": 50.0, "width": 0.4, "keypointlabels": ["nose_bridge_4"]},
            "score": 0.9,
        }
        return [{"result": [region], "score": 0.25} for _ in tasks]

    ls = label_studio
    pid = ls.create_project("harness: local ML backend", label_config_xml)
    task_ids = ls.import_tasks(
        pid, [{"image": "/data/upload/none/a.jpg"}, {"image": "/data/upload/none/b.jpg"}]
    )
    with StubMLBackend(model_version="stub-v1", predict=predict) as stub:
        backend_id = ls.connect_ml_backend(pid, stub.url, title="stub")
        assert stub.paths()[:2] == ["/health", "/setup"]
        setup = next(body for method, path, body in stub.calls if path == "/setup")
        assert setup["schema"] == label_config_xml.strip()  # Label Studio strips the config
        assert setup["access_token"] == ls.token  # the project creator's legacy token
        assert setup["hostname"] == f"http://localhost:{ls.port}"  # no LABEL_STUDIO_HOST set
        assert re.fullmatch(r"\d+\.\d+", setup["project"]) and setup["project"].startswith(f"{pid}.")
        assert [w["url"] for w in ls.list_webhooks(pid)] == [f"{stub.url}/webhook"]
        assert ls.get_ml_backend(backend_id)["state"] == "CO"  # connected
        # Label Studio names the project's model_version after the backend's TITLE, not its version, and
        # refuses a model_version that is neither a backend's title nor that of an existing prediction:
        assert ls.get_project(pid)["model_version"] == "stub"
        with pytest.raises(LabelStudioError, match="Model version doesn't exist"):
            ls.set_model_version(pid, "stub-v1")

        stub.calls.clear()
        out = ls.retrieve_predictions(pid, [task_ids[0]])
        assert out["processed_items"] == 1
        predict_calls = [body for method, path, body in stub.calls if path == "/predict"]
        assert len(predict_calls) == 1 and [t["id"] for t in predict_calls[0]["tasks"]] == [task_ids[0]]
        (pred,) = ls.get_predictions(task_ids[0])
        assert pred["score"] == pytest.approx(0.25) and pred["model_version"] == "stub-v1"
        assert pred["result"][0]["value"]["keypointlabels"] == ["nose_bridge_4"]
        assert ls.get_predictions(task_ids[1]) == []

        # The Data Manager's prediction score only counts predictions of the project's model_version:
        # none while it is the title; the backend's score once the version (now held by a prediction) is set.
        def score_of(task_id: int) -> float | None:
            return next(t["predictions_score"] for t in ls.list_tasks(pid) if t["id"] == task_id)

        assert score_of(task_ids[0]) is None
        assert ls.set_model_version(pid, "stub-v1")["model_version"] == "stub-v1"
        assert score_of(task_ids[0]) == pytest.approx(0.25)

        def webhook_actions() -> list[str]:
            return [b.get("action") for m, p, b in stub.calls if p == "/webhook" and isinstance(b, dict)]

        stub.calls.clear()
        ls.create_annotation(task_ids[1], _face_result(100, 100, [(50.0, 50.0)] * 68))
        assert _wait_for(lambda: "ANNOTATION_CREATED" in webhook_actions()), stub.calls

        stub.calls.clear()
        ls.train_ml_backend(backend_id)
        assert _wait_for(lambda: "START_TRAINING" in webhook_actions()), stub.calls
        start = next(b for m, p, b in stub.calls if p == "/webhook" and b.get("action") == "START_TRAINING")
        assert start["project"]["id"] == pid
