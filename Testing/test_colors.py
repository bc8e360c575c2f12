"""Label colours are visible and distinct (the real AAL table), and the overlay PNG shows the requested labels."""
import colorsys
import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread
from PIL import Image

from LabelConditionedSegLib.engine import Condition
from LabelConditionedSegLib.labels import (CROWD_LABELS, MIN_CHROMA, MIN_DISTANCE, MIN_LUMINANCE, NEAR_DISTANCE,
                                           PARTNER_LUMINANCE, Label, LabelTable, partners, side)
from LabelConditionedSegLib.outputs import (OVERLAY_IMAGES_RIGHT, OVERLAY_VIEWS, _lps_arrays, _slices_with_most_labels,
                                            _view, write_overlay_png)

TEMPLATES = Path("/usr/share/mricron/templates")
AAL = (TEMPLATES / "aal.nii.txt", TEMPLATES / "aal.nii.lut")
HIPPOCAMPI = {"Hippocampus_L": 37, "Hippocampus_R": 38}


def luminance(color):
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def visible(color):
    """Shows on black (luminance) and on a grey brain (chroma: not itself grey)."""
    return luminance(color) >= MIN_LUMINANCE and max(color) - min(color) >= MIN_CHROMA


@pytest.fixture(scope="module")
def aal() -> LabelTable:
    return LabelTable.from_mricron(*AAL)


@pytest.fixture(scope="module")
def raw_colors(aal) -> dict[str, tuple]:
    """The AAL palette as MRIcron ships it (RRR..GGG..BBB), by label name."""
    palette = AAL[1].read_bytes()
    return {label.name: (palette[label.value], palette[256 + label.value], palette[512 + label.value]) for label in aal}


@pytest.fixture(scope="module")
def atlas() -> tuple[np.ndarray, np.ndarray]:
    """Colin27 (0..1) and the AAL label map (all 116 labels) on the overlay's LPS grid."""
    return _lps_arrays(sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz")), sitk.ReadImage(str(TEMPLATES / "aal.nii.gz")),
                       list(range(1, 117)))


def test_raw_aal_palette_has_the_reported_defect(raw_colors):
    assert sum(color == (0, 0, 0) for color in raw_colors.values()) == 16
    assert raw_colors["Insula_L"] == raw_colors["Insula_R"] == (0, 0, 0)
    assert raw_colors["Hippocampus_L"] == raw_colors["Hippocampus_R"]
    assert raw_colors["Precentral_L"] == (204, 204, 204)  # light grey: invisible on a grey brain


def test_aal_colors_are_visible_and_distinct(aal, raw_colors):
    assert len(aal) == 116
    assert all(visible(label.color) for label in aal)
    for a, b in itertools.combinations(aal, 2):
        assert math.dist(a.color, b.color) >= NEAR_DISTANCE, (a, b)
        if a.color != raw_colors[a.name] or b.color != raw_colors[b.name]:  # a replacement keeps the wider margin
            assert math.dist(a.color, b.color) >= MIN_DISTANCE, (a, b)
    partners = [(label, aal.resolve(label.name[:-2] + "_R")) for label in aal if label.name.endswith("_L")]
    assert len(partners) == 54
    assert all(math.dist(left.color, right.color) >= MIN_DISTANCE for left, right in partners)
    # one of each pair clearly lighter: told apart also in greyscale and by colour-blind readers
    assert all(abs(luminance(left.color) - luminance(right.color)) >= PARTNER_LUMINANCE for left, right in partners)


def test_aal_keeps_the_source_colors_that_are_visible_and_unique(aal, raw_colors):
    changed = {label.name for label in aal if label.color != raw_colors[label.name]}
    visible_names = [name for name in raw_colors if visible(raw_colors[name])]
    # the first holder of a visible colour that no other (different) visible source colour comes near
    unique = [name for i, name in enumerate(visible_names)
              if all(raw_colors[other] == raw_colors[name] or math.dist(raw_colors[other], raw_colors[name]) >= NEAR_DISTANCE
                     for other in visible_names)
              and all(raw_colors[other] != raw_colors[name] for other in visible_names[:i])]
    assert len(unique) == 16  # 21 visible on black, less Precentral_L, Frontal_Sup_L, Lingual_L, .. (greyish)
    assert not changed & set(unique)
    assert {name for name, color in raw_colors.items() if color == (0, 0, 0)} <= changed  # Insula, Rectus, Vermis_7..
    assert all(name in changed for name in raw_colors if not visible(raw_colors[name]))  # Precentral_L: grey
    assert len(changed) == 95
    # a taken colour first becomes a lighter/darker shade of its partner's: partners stay related
    assert aal.resolve("Cingulum_Ant_L").color == (203, 203, 108)
    assert aal.resolve("Cingulum_Ant_R").color == (117, 117, 41)  # the same hue, darker (HLS lightness 0.61 -> 0.31)
    assert aal.resolve("Precentral_R").color == (255, 102, 102)  # Precentral_L became (255, 0, 0)


def test_left_right_partners_are_found_by_name_and_told_apart_by_lightness():
    assert side("Hippocampus_L") == ("Hippocampus", "L")
    assert side("Left-Hippocampus") == ("Hippocampus", "L")
    assert side("ctx-rh-insula") == ("ctx-insula", "R")
    assert side("Vermis_1_2") is None and side("Hippocampus_L+Hippocampus_R") is None  # no side, or two
    names = ["Left-Hippocampus", "Right-Hippocampus", "Left-Amygdala", "Brain-Stem", "Right-Amygdala", "Left-Putamen"]
    assert partners(names) == {0: 1, 1: 0, 2: 4, 4: 2}
    # FreeSurfer-style names, each pair given one colour, and a greyish blue
    table = LabelTable([Label(17, "Left-Hippocampus", (220, 216, 20)), Label(53, "Right-Hippocampus", (220, 216, 20)),
                        Label(18, "Left-Amygdala", (103, 255, 255)), Label(54, "Right-Amygdala", (103, 255, 255)),
                        Label(16, "Brain-Stem", (119, 159, 176))])
    colors = {label.name: label.color for label in table}
    assert all(visible(color) for color in colors.values()) and colors["Brain-Stem"] != (119, 159, 176)
    for structure in ("Hippocampus", "Amygdala"):
        left, right = colors[f"Left-{structure}"], colors[f"Right-{structure}"]
        assert abs(luminance(left) - luminance(right)) >= PARTNER_LUMINANCE, structure
        hues = [colorsys.rgb_to_hls(*(c / 255 for c in color))[0] for color in (left, right)]
        assert hues[0] == pytest.approx(hues[1], abs=0.02), structure  # one hue: a lighter or darker shade
    assert colors["Left-Hippocampus"] == (220, 216, 20)
    assert LabelTable(table.labels).labels == table.labels


def test_colors_are_deterministic_and_survive_saving(aal, tmp_path):
    assert [l.color for l in LabelTable.from_mricron(*AAL)] == [l.color for l in aal]
    aal.write_csv(tmp_path / "labels.csv")
    assert LabelTable.read_csv(tmp_path / "labels.csv").labels == aal.labels
    assert LabelTable.from_rows(aal.to_rows()).labels == aal.labels  # what a checkpoint stores
    subset = aal.labels[::5]
    assert LabelTable(subset).labels == subset


def test_all_black_csv_gets_visible_distinct_colors(tmp_path):
    path = tmp_path / "black.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["value", "name", "r", "g", "b"])
        writer.writerows([v, f"Region{(v + 1) // 2}_{'LR'[v % 2 == 0]}", 0, 0, 0] for v in range(1, 41))
    table = LabelTable.read_csv(path)
    assert [l.name for l in table][:2] == ["Region1_L", "Region1_R"]
    assert all(luminance(l.color) >= MIN_LUMINANCE for l in table)
    assert all(math.dist(a.color, b.color) >= MIN_DISTANCE for a, b in itertools.combinations(table, 2))


def test_a_crowded_table_gets_the_best_spacing_that_fits():
    """~700 random colours, as the INIA19 NeuroMaps table is made: too many for MIN_DISTANCE, still visible and stable."""
    colors = np.random.default_rng(19).integers(40, 256, (700, 3))
    table = LabelTable(Label(v, f"NeuroMaps_{v}", tuple(int(c) for c in rgb)) for v, rgb in enumerate(colors, 1))
    spacing = NEAR_DISTANCE * (CROWD_LABELS / 700) ** (1 / 3)
    assert all(luminance(l.color) >= MIN_LUMINANCE for l in table)
    assert all(math.dist(a.color, b.color) >= spacing for a, b in itertools.combinations(table, 2))
    assert LabelTable(table.labels).labels == table.labels


def test_chosen_slices_show_the_most_requested_labels(atlas):
    _, labels = atlas
    values = list(HIPPOCAMPI.values())
    slices = _slices_with_most_labels(labels, values)
    for axis, index in enumerate(slices):
        kinds = [len(set(np.unique(np.take(labels, i, axis))) & set(values)) for i in range(labels.shape[axis])]
        areas = [int(np.isin(np.take(labels, i, axis), values).sum()) for i in range(labels.shape[axis])]
        best = max(range(len(kinds)), key=lambda i: (kinds[i], areas[i]))
        assert (kinds[index], areas[index]) == (kinds[best], areas[best])
    assert all(set(values) <= set(np.unique(np.take(labels, slices[axis], axis))) for axis in (0, 1))
    assert set(values) & set(np.unique(labels[:, :, slices[2]]))
    # the centroid of both (the old choice) is a midline sagittal slice that misses both hippocampi
    centroid_x = int(np.mean(np.nonzero(np.isin(labels, values))[2]))
    assert not set(values) & set(np.unique(labels[:, :, centroid_x]))
    assert _slices_with_most_labels(labels, [999]) == [size // 2 for size in labels.shape]


def test_views_show_the_orientation_their_letters_say(atlas):
    _, labels = atlas

    def centre(axis, value, other):
        """(row, column) of `value` in the view through the slice that shows both `value` and `other`."""
        view = _view(labels, axis, _slices_with_most_labels(labels, [value, other])[axis])
        return np.mean(np.nonzero(view == value), axis=1)

    letters = {name: (left, right) for name, _, left, right in OVERLAY_VIEWS}
    assert letters == {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}
    for axis in (0, 1):  # Hippocampus_R on the image's left, where the "R" is
        assert centre(axis, 38, 37)[1] < centre(axis, 37, 38)[1]
    assert centre(2, 3, 49)[1] < centre(2, 49, 3)[1]  # Frontal_Sup_L left of Occipital_Sup_L, where the "A" is
    assert centre(0, 3, 49)[0] < centre(0, 49, 3)[0]  # axial: anterior at the top
    for axis in (1, 2):  # Precentral_L above Hippocampus_L: superior at the top
        assert centre(axis, 1, 37)[0] < centre(axis, 37, 1)[0]


def test_overlay_png_shows_both_hippocampi_legend_and_title(aal, tmp_path):
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    labelmap = sitk.ReadImage(str(TEMPLATES / "aal.nii.gz"))  # all 116 labels; only the requested two are drawn
    array = sitk.GetArrayViewFromImage(labelmap)
    conditions = [Condition.of(name, value, array == value, aal.get(value).color) for name, value in HIPPOCAMPI.items()]
    title = "segmented 2 of 2 labels on cpu in 1.0 s"
    write_overlay_png(image, labelmap, conditions, tmp_path / "titled.png", title=title)
    write_overlay_png(image, labelmap, conditions, tmp_path / "default.png")
    assert Image.open(tmp_path / "titled.png").text["Title"] == title
    assert Image.open(tmp_path / "default.png").text["Title"] == "2 labels"

    pixels = np.round(imread(tmp_path / "titled.png")[..., :3] * 255).astype(int)
    split = int(OVERLAY_IMAGES_RIGHT * pixels.shape[1])
    views, legend = pixels[:, :split], pixels[:, split:]
    other_colors = {l.color for l in aal if l.value not in HIPPOCAMPI.values() and len(set(l.color)) > 1}  # not grey
    for c in conditions:
        assert np.all(views == c.color, axis=-1).sum() > 50, c.name  # outlines drawn in the label's own colour
        assert np.all(legend == c.color, axis=-1).sum() > 20, c.name  # its legend swatch
    assert not any(np.all(views == color, axis=-1).any() for color in other_colors)  # unrequested labels not drawn
