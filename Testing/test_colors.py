"""Label colours are visible and distinct (the real AAL table), and the overlay PNG shows the requested labels."""
import colorsys
import csv
import itertools
import locale
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread
from PIL import Image

from LabelConditionedSegLib.engine import Condition
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.labels import (CROWD_LABELS, MIN_CHROMA, MIN_DISTANCE, MIN_LUMINANCE, NEAR_DISTANCE,
                                           PARTNER_LUMINANCE, Label, LabelTable, partners, side)
from LabelConditionedSegLib.outputs import (OVERLAY_VIEWS, _lps_arrays, _slices_with_most_labels, _view, legend_entries,
                                            slice_position, write_overlay_png)

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
                       list(range(1, 117)))[:2]


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


def aal_conditions(aal, values) -> list[Condition]:
    """The labels as `lcs segment` asks for them; the overlay reads only their names, values and colours."""
    return [Condition(aal.get(v).name, v, np.zeros((0, 0, 0), bool), aal.get(v).color) for v in values]


def views_and_legend(path) -> tuple[np.ndarray, np.ndarray]:
    """The PNG's RGB split above and below the last row that is mostly image (the views' black surround): the
    views, and the legend under them."""
    pixels = np.round(imread(path)[..., :3] * 255).astype(int)
    image_rows = np.nonzero((pixels != 255).any(-1).mean(1) > 0.5)[0]
    return pixels[:image_rows[-1] + 1], pixels[image_rows[-1] + 1:]


def color_counts(pixels: np.ndarray) -> dict[tuple[int, int, int], int]:
    """How many pixels have each RGB colour."""
    codes, counts = np.unique(pixels.reshape(-1, 3) @ [65536, 256, 1], return_counts=True)
    return {(int(code) >> 16, int(code) >> 8 & 255, int(code) & 255): int(n) for code, n in zip(codes, counts)}


def test_overlay_png_shows_both_hippocampi_legend_and_title(aal, tmp_path):
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    labelmap = sitk.ReadImage(str(TEMPLATES / "aal.nii.gz"))  # all 116 labels; only the requested two are drawn
    conditions = aal_conditions(aal, HIPPOCAMPI.values())
    title = "segmented 2 of 2 labels on cpu in 1.0 s"
    write_overlay_png(image, labelmap, conditions, tmp_path / "titled.png", title=title, scan="ch2.nii.gz",
                      model="Colin27 AAL demo", registration="affine")
    write_overlay_png(image, labelmap, conditions, tmp_path / "default.png")
    assert Image.open(tmp_path / "titled.png").text["Title"] == (
        "scan: ch2.nii.gz  |  model: Colin27 AAL demo  |  registration: affine; " + title)
    assert Image.open(tmp_path / "default.png").text["Title"] == "2 labels"

    views, legend = (color_counts(pixels) for pixels in views_and_legend(tmp_path / "titled.png"))
    for c in conditions:
        assert views.get(c.color, 0) > 50, c.name  # outlines drawn in the label's own colour
        assert legend.get(c.color, 0) > 20, c.name  # its legend swatch
    assert not [l.name for l in aal if l.value not in HIPPOCAMPI.values() and l.color in views]  # unrequested: not drawn
    assert legend_entries(conditions) == [("Hippocampus L / R", [c.color for c in conditions])]


def test_overlay_legend_holds_every_label_shown_at_full_resolution(aal, tmp_path):
    """All 116 AAL labels: every one drawn in the views has its swatch in the legend (none cut to "+N more"), left/right
    partners share a line, and each Colin27 voxel is drawn as 4 x 4 pixels (at least 1800 px of views)."""
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    conditions = aal_conditions(aal, aal.values)
    write_overlay_png(image, sitk.ReadImage(str(TEMPLATES / "aal.nii.gz")), conditions, tmp_path / "all.png")
    views, legend = (color_counts(pixels) for pixels in views_and_legend(tmp_path / "all.png"))
    drawn = [c.name for c in conditions if c.color in views]
    assert len(drawn) > 80
    assert [c.name for c in conditions if legend.get(c.color, 0) >= 200] == drawn  # a swatch for each, no others
    assert imread(tmp_path / "all.png").shape[1] == 4 * (181 + 181 + 217) + 4 * 30 >= 1800  # 3 views, 4 gaps

    entries = legend_entries(conditions)
    assert len(entries) == 54 + 8  # 54 L/R pairs on one line each, 8 vermis labels alone
    assert ("Precentral L / R", [aal.resolve("Precentral_L").color, aal.resolve("Precentral_R").color]) in entries
    assert sorted(color for _, colors in entries for color in colors) == sorted(c.color for c in conditions)


@pytest.mark.parametrize("variant", ["as stored", "x flipped", "axes permuted and flipped", "oblique"])
def test_slice_positions_are_the_files_own_voxel_and_ras_mm(variant):
    """A 3D cross of label 1 at a known voxel of the file: each view goes through it, and its title gives that voxel's
    index in the file's own i, j, k (as a viewer shows them) and its RAS position, however the file's axes run."""
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))  # 181 x 217 x 181, 1 mm, no rotation
    letters = {"axial": "k", "coronal": "j", "sagittal": "i"}  # which file axis each view steps along
    if variant == "x flipped":
        image = sitk.Flip(image, [True, False, False])
    if variant == "axes permuted and flipped":  # the file's i runs inferior-superior, j left-right, k front-back
        image = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, False])
        letters = {"axial": "i", "coronal": "k", "sagittal": "j"}
    if variant == "oblique":  # tilted 8 degrees about the left-right axis, as a scan planned along the AC-PC line
        rotation = sitk.VersorTransform((1, 0, 0), np.radians(8))
        image.SetDirection((np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    voxel = (70, 120, 100)
    labelmap = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labelmap.CopyInformation(image)
    for axis in range(3):
        for step in (-1, 0, 1):
            labelmap[tuple(v + step * (a == axis) for a, v in enumerate(voxel))] = 1
    _, labels, grid = _lps_arrays(image, labelmap, [1])
    slices = _slices_with_most_labels(labels, [1])
    ras = np.multiply(image.TransformIndexToPhysicalPoint(voxel), (-1, -1, 1))
    for name, axis, _, _ in OVERLAY_VIEWS:
        along = "ijk".index(letters[name])
        world = 2 - axis
        text = slice_position(image, grid, axis, slices[axis])
        assert text.startswith(f"voxel {letters[name]} = {voxel[along]}, {'RAS'[world]} = "), (text, variant)
        if variant != "oblique":  # a tilted slice's RAS position changes across it; the title gives its centre's
            assert text.endswith(f" = {ras[world]:.1f} mm (RAS)"), (text, variant)


def test_label_tables_are_utf8_whatever_the_locale_and_other_encodings_are_refused_in_one_line(tmp_path):
    """Slicer may run Python with the C locale (ASCII by default): names beyond ASCII still read and write as UTF-8,
    and a table saved in another encoding is refused with what to do."""
    table = LabelTable([Label(1, "Hippokampus_links_ä", (200, 40, 40)), Label(2, "Amígdala_R", (40, 200, 40))])
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # what VTK leaves in Slicer's process
    try:
        table.write_csv(tmp_path / "labels.csv")
        names = [l.name for l in LabelTable.read_csv(tmp_path / "labels.csv")]
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert "Hippokampus_links_ä" in (tmp_path / "labels.csv").read_bytes().decode("utf-8")
    assert names == ["Hippokampus_links_ä", "Amígdala_R"]
    (tmp_path / "latin1.csv").write_bytes("value,name,r,g,b\n1,Amígdala_R,40,200,40\n".encode("latin-1"))
    with pytest.raises(LCSError, match="is not UTF-8 text; save it as UTF-8"):
        LabelTable.read_csv(tmp_path / "latin1.csv")
