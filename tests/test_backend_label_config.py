"""Label config parsing: which tags the backend fills and which 300-W point each keypoint label gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.label_config import LabelConfigError, normalize_name, parse_label_config
from model.schemes import get_scheme

ROOT = Path(__file__).resolve().parents[1]
SCHEME = get_scheme("300w_68")


def config(labels: str, *, rect: bool = True, image: str = '<Image name="img" value="$photo"/>') -> str:
    rect_xml = (
        '<RectangleLabels name="box" toName="img"><Label value="Face"/></RectangleLabels>' if rect else ""
    )
    return f'<View>{image}{rect_xml}<KeyPointLabels name="kp" toName="img">{labels}</KeyPointLabels></View>'


def test_project_label_config_maps_all_68_points_by_name() -> None:
    m = parse_label_config((ROOT / "label_config.xml").read_text())
    assert m.indices == list(range(68))
    assert m.labels == list(SCHEME.point_names)
    assert (m.image_name, m.image_key, m.image_url) == ("image", "image", None)
    assert (m.keypoints_from_name, m.face_from_name, m.face_label) == ("keypoints", "face", "Face")
    assert m.unmapped == ()


def test_subset_of_points_is_accepted_and_unknown_labels_reported() -> None:
    m = parse_label_config(
        config('<Label value="right_eye_outer"/><Label value="left_eye_outer"/><Label value="ear_lobe"/>')
    )
    assert m.points == ((36, "right_eye_outer"), (45, "left_eye_outer"))
    assert [label for label, _ in m.unmapped] == ["ear_lobe"]
    assert (m.image_name, m.image_key, m.face_from_name, m.face_label) == ("img", "photo", "box", "Face")


def test_names_are_matched_loosely_and_aliases_apply() -> None:
    m = parse_label_config(
        config(
            '<Label value="Jaw 1"/><Label value="MOUTH-OUTER-01"/>'
            '<Label value="nose tip"/><Label value="chin"/>'
        )
    )
    assert m.points == ((0, "Jaw 1"), (8, "chin"), (30, "nose tip"), (48, "MOUTH-OUTER-01"))
    assert normalize_name("jaw_01") == normalize_name("Jaw-1") == "jaw_1"


def test_renamed_labels_via_predicted_values_names_indices_and_ranges() -> None:
    m = parse_label_config(
        config(
            '<Label value="Eye R" predicted_values="right_eye_outer"/>'
            '<Label value="Tip" predicted_values="30"/>'
            '<Label value="Mouth" predicted_values="48-50, 54"/>'
            '<Label value="Broken" predicted_values="nowhere"/>'
        )
    )
    assert m.points == (
        (30, "Tip"),
        (36, "Eye R"),
        (48, "Mouth"),
        (49, "Mouth"),
        (50, "Mouth"),
        (54, "Mouth"),
    )
    assert m.unmapped[0][0] == "Broken" and "nowhere" in m.unmapped[0][1]


def test_one_generic_label_for_all_points() -> None:
    m = parse_label_config(config('<Label value="landmark" predicted_values="0-67"/>', rect=False))
    assert m.indices == list(range(68)) and set(m.labels) == {"landmark"}
    assert m.face_from_name is None and m.face_label is None


def test_first_label_keeps_a_point_claimed_twice() -> None:
    m = parse_label_config(config('<Label value="chin"/><Label value="jaw_09"/>'))
    assert m.points == ((8, "chin"),)
    assert m.unmapped[0][0] == "jaw_09" and "already mapped" in m.unmapped[0][1]


def test_face_label_is_found_among_several_rectangle_labels() -> None:
    xml = (
        '<View><Image name="img" value="$image"/>'
        '<RectangleLabels name="boxes" toName="img">'
        '<Label value="Car"/><Label value="face"/></RectangleLabels>'
        '<KeyPointLabels name="kp" toName="img"><Label value="nose_tip"/></KeyPointLabels></View>'
    )
    m = parse_label_config(xml)
    assert (m.face_from_name, m.face_label) == ("boxes", "face")


def test_literal_image_url_in_config() -> None:
    m = parse_label_config(
        config('<Label value="chin"/>', image='<Image name="img" value="/data/upload/1/a.jpg"/>')
    )
    assert m.image_key is None and m.image_url == "/data/upload/1/a.jpg"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ('<View><Image name="img" value="$image"/></View>', "no <KeyPointLabels>"),
        (
            '<View><Text name="t" value="$text"/><KeyPointLabels name="kp" toName="t">'
            '<Label value="chin"/></KeyPointLabels></View>',
            "no <Image>",
        ),
        (
            '<View><Image name="img" value="$image"/><KeyPointLabels name="kp" toName="other">'
            '<Label value="chin"/></KeyPointLabels></View>',
            "not connected to an <Image>",
        ),
        (config('<Label value="Ear"/><Label value="Hat"/>'), "none of the <KeyPointLabels> labels maps"),
        ("<View><Image", "not valid XML"),
        ("", "empty"),
    ],
)
def test_configs_that_cannot_be_served_are_rejected_with_what_is_missing(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)
    with pytest.raises(LabelConfigError, match=message):  # the cached rejection says the same
        parse_label_config(xml)


def test_nothing_maps_message_lists_the_labels_and_the_fix() -> None:
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(config('<Label value="Ear"/><Label value="Hat"/>'))
    text = str(info.value)
    assert "Ear, Hat" in text and "predicted_values" in text and "jaw_01" in text
