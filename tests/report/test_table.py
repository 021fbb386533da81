"""The organ table: volumes, intensities, completeness and not-found structures on tiny phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.errors import DataError
from medseg.labels import LabelLayout
from medseg.report import anatomical_side, structure_table
from medseg.report.table import table_csv
from medseg.types import Volume


def test_cube_volume_and_intensity_are_hand_computable(ph: tuple[Volume, Volume], spec: LabelLayout) -> None:
    img, lab = ph
    table = structure_table(img, lab, spec)
    liver = table.rows[0]
    assert (liver.structure, liver.label, liver.n_voxels) == ("liver", 1, 64)
    assert liver.size == pytest.approx(0.16, rel=1e-12)  # 64 voxels x 2.5 mm³ = 160 mm³
    assert liver.mean_intensity == pytest.approx(31.5, rel=1e-12)
    assert liver.std_intensity == pytest.approx(math.sqrt((64**2 - 1) / 12), rel=1e-12)
    assert liver.complete and liver.incomplete_sides == [] and liver.border_sides == []
    assert liver.centre in {(c0, c1, c2) for c0 in (3, 4) for c1 in (3, 4) for c2 in (3, 4)}
    assert table.size_key == "volume_ml"


def test_structure_cut_by_field_of_view_is_incomplete_with_side(
    ph: tuple[Volume, Volume], spec: LabelLayout
) -> None:
    img, lab = ph
    spleen = structure_table(img, lab, spec).rows[1]
    assert spleen.structure == "spleen"
    assert spleen.size == pytest.approx(0.02, rel=1e-12) and spleen.mean_intensity == 100.0
    assert spleen.std_intensity == 0.0
    assert spleen.complete is False
    assert spleen.border_sides == ["z_min"]
    assert spleen.incomplete_sides == ["inferior"]  # RAS: first slice is the inferior end


def test_incomplete_side_follows_the_affine(ph: tuple[Volume, Volume], spec: LabelLayout) -> None:
    img, lab = ph
    lps = np.diag([-1.0, -1.0, 2.5, 1.0])  # x runs to the patient's left: x_max is the left side
    arr = np.zeros_like(lab.array)
    arr[0, 10:12, 4:6, 3:5] = 1
    row = structure_table(img.with_array(img.array), Volume(arr, lps), spec).rows[0]
    row2 = structure_table(Volume(img.array, lps), Volume(arr, lps), spec).rows[0]
    assert row.incomplete_sides == ["right"] and row2.incomplete_sides == ["left"]
    assert anatomical_side("z_max", np.diag([1, 1, -1, 1])) == "inferior"


def test_absent_structure_is_not_found_not_zero(ph: tuple[Volume, Volume], spec: LabelLayout) -> None:
    img, lab = ph
    table = structure_table(img, lab, spec)
    assert [r.structure for r in table.rows] == ["liver", "spleen"]
    assert table.not_found == ["kidney"]
    csv = table_csv(table)
    assert "kidney" not in csv
    header, liver, spleen = csv.strip().splitlines()
    assert header.split(",")[:7] == [
        "structure",
        "label",
        "volume_ml",
        "n_voxels",
        "mean_intensity",
        "std_intensity",
        "complete",
    ]
    assert liver.startswith("liver,1,0.16,64,31.5,") and liver.endswith(",true,,")
    assert spleen.endswith(",false,inferior,z_min")


def test_unnamed_value_gets_a_row_rather_than_being_dropped(
    ph: tuple[Volume, Volume], spec: LabelLayout
) -> None:
    img, lab = ph
    arr = lab.array.copy()
    arr[0, 0, 0, 7] = 9
    table = structure_table(img, lab.with_array(arr), spec)
    assert table.rows[-1].structure == "label_9" and table.rows[-1].n_voxels == 1


def test_per_structure_masks_may_overlap(ph: tuple[Volume, Volume], spec: LabelLayout) -> None:
    img, lab = ph
    masks = np.zeros((2, 12, 10, 8), dtype=np.uint8)
    masks[0] = lab.array[0] == 1
    masks[1, 2:4, 2:6, 2:6] = 255  # overlaps half of the cube; PNG-style 255 counts as inside
    spec = LabelLayout("sigmoid", ("liver", "lesion"), (1, 2))
    table = structure_table(img, lab.with_array(masks), spec)
    assert [(r.structure, r.n_voxels) for r in table.rows] == [("liver", 64), ("lesion", 32)]
    assert table.rows[1].mean_intensity == pytest.approx(np.arange(32).mean())
    with pytest.raises(DataError, match="2 mask channel"):
        structure_table(img, lab.with_array(masks), LabelLayout("sigmoid", ("a", "b", "c"), (1, 2, 3)))


def test_2d_image_gets_areas_in_cm2_and_image_edges(ph: tuple[Volume, Volume], spec: LabelLayout) -> None:
    img = Volume(np.ones((1, 40, 30), dtype=np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    lab = np.zeros((1, 40, 30), dtype=np.uint8)
    lab[0, 5:15, 0:10] = 1  # 100 pixels at 0.25 mm² = 0.25 cm², touching the top edge (y_min)
    table = structure_table(img, img.with_array(lab), LabelLayout("softmax", ("lung",), (1,)))
    row = table.rows[0]
    assert table.size_key == "area_cm2" and row.size == pytest.approx(0.25)
    assert row.incomplete_sides == ["top edge"] and row.border_sides == ["y_min"]


def test_probabilities_are_refused_as_a_label_map(ph: tuple[Volume, Volume], spec: LabelLayout) -> None:
    img, lab = ph
    with pytest.raises(DataError, match="whole numbers"):
        structure_table(img, lab.with_array(lab.array.astype(np.float32) * 0.5), spec)
