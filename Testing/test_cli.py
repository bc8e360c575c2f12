"""`lcs` end to end on real files, and one clear line (exit 2, no traceback) for every bad input."""
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.geometry import model_grid

from conftest import TINY_LABELS, dice, heldout_subject

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subject(colin27, tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    image, truth = heldout_subject(colin27, seed=31)
    sitk.WriteImage(image, str(folder / "scan.nrrd"))
    sitk.WriteImage(truth, str(folder / "truth.nrrd"))
    return folder


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_seg_nrrd_labelmap_csv_png_and_probabilities(tiny_checkpoint, subject, tmp_path, capsys):
    out = tmp_path / "result"
    code, stdout, err = run(["segment", subject / "scan.nrrd", "-o", out / "scan.seg.nrrd", "--checkpoint", tiny_checkpoint,
                             "--labels", ",".join(TINY_LABELS), "--labelmap", out / "labels.nii.gz", "--volumes-csv", out / "v.csv",
                             "--overlay", out / "overlay.png", "--probabilities", out / "prob", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert "segmented" in stdout and "wrote" in stdout
    scan, truth = sitk.ReadImage(str(subject / "scan.nrrd")), sitk.ReadImage(str(subject / "truth.nrrd"))
    labelmap = sitk.ReadImage(str(out / "labels.nii.gz"))
    assert labelmap.GetSize() == scan.GetSize()
    assert np.allclose(labelmap.GetSpacing(), scan.GetSpacing()) and np.allclose(labelmap.GetOrigin(), scan.GetOrigin())
    assert np.allclose(labelmap.GetDirection(), scan.GetDirection())
    t, p = sitk.GetArrayFromImage(truth), sitk.GetArrayFromImage(labelmap)
    assert np.mean([dice(t == v, p == v) for v in (3, 4, 85, 86, 99, 68)]) > 0.45
    seg = sitk.ReadImage(str(out / "scan.seg.nrrd"))
    names = {seg.GetMetaData(f"Segment{i}_Name") for i in range(6)}
    assert names == set(TINY_LABELS)
    assert seg.GetMetaData("Segment0_LabelValue") in {"3", "4", "85", "86", "99", "68"}
    own = segment_masks(out / "scan.seg.nrrd")
    rows = list(csv.DictReader(open(out / "v.csv")))
    assert [r["name"] for r in rows] == TINY_LABELS and all(float(r["volume_ml"]) > 1 for r in rows)
    for r in rows:  # segments are each label's own mask; the label map gives contested voxels to one label
        assert own[r["name"]].sum() == int(r["voxels"])
        assert dice(own[r["name"]], p == int(r["value"])) > 0.9, r["name"]
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    title = Image.open(out / "overlay.png").text["Title"]  # the heading names the scan, the model and the registration
    assert title.startswith("scan: scan.nrrd  |  model: tiny test model  |  registration: affine; segmented 6 of 6 labels")
    probabilities = sorted((out / "prob").glob("*.nii.gz"))
    assert len(probabilities) == 6
    first = sitk.ReadImage(str(probabilities[0]))
    assert first.GetSize() == scan.GetSize() and 0 <= sitk.GetArrayViewFromImage(first).min() <= sitk.GetArrayViewFromImage(first).max() <= 1


def test_slicer_reads_the_segmentation_with_names_values_and_colors(tiny_checkpoint, tiny, subject, tmp_path, capsys):
    """Slicer's own segmentation storage node (PyPI's slicer-core) loads what `lcs segment` writes."""
    slicer = pytest.importorskip("slicer")
    code, _, err = run(["segment", subject / "scan.nrrd", "-o", tmp_path / "s.seg.nrrd", "--checkpoint", tiny_checkpoint,
                        "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "s.seg.nrrd"))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(tiny.label_table)
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        label = tiny.label_table.resolve(segment.GetName())
        assert segment.GetLabelValue() == label.value
        assert np.allclose(segment.GetColor(), np.array(label.color) / 255, atol=1e-3)


def segment_masks(path: Path) -> dict[str, np.ndarray]:
    """Each segment of a .seg.nrrd as a boolean array (z, y, x), from its layer and label value."""
    seg = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(seg)
    layers = array[None] if seg.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(array, -1, 0)
    count = len([k for k in seg.GetMetaDataKeys() if k.endswith("_Name")])
    return {seg.GetMetaData(f"Segment{i}_Name"): layers[int(seg.GetMetaData(f"Segment{i}_Layer"))]
            == int(seg.GetMetaData(f"Segment{i}_LabelValue")) for i in range(count)}


def test_a_label_and_a_union_holding_it_are_two_overlapping_segments(tiny_checkpoint, tiny, colin27, subject, tmp_path,
                                                                      capsys):
    """Each requested label gets its own ID and value, and its own mask: a label inside a union stays whole, and its
    volume does not depend on what else was asked. The single label map keeps one label per voxel."""
    corner = sitk.Image(tiny.atlas_image.GetSize(), sitk.sitkUInt8)
    corner.CopyInformation(tiny.atlas_image)
    corner[0:3, 0:3, 0:3] = 1  # a region in the air outside the head: nothing there to find
    sitk.WriteImage(corner, str(tmp_path / "corner.nii.gz"))
    both = "Frontal_Sup_L,Frontal_Sup_L+Frontal_Sup_R"
    code, stdout, err = run(["segment", subject / "scan.nrrd", "-o", tmp_path / "both.seg.nrrd", "--labels", both,
                             "--condition", tmp_path / "corner.nii.gz", "--name", "air", "--checkpoint", tiny_checkpoint,
                             "--volumes-csv", tmp_path / "both.csv", "--labelmap", tmp_path / "both.nii.gz", "--quiet",
                             "--device", "cpu"], capsys)
    assert code == 0, err
    assert "segmented 2 of 3 labels (found nowhere: air)" in stdout
    seg = sitk.ReadImage(str(tmp_path / "both.seg.nrrd"))
    fields = [{k: seg.GetMetaData(f"Segment{i}_{k}") for k in ("ID", "Name", "LabelValue", "Layer")} for i in range(3)]
    assert len({f["ID"] for f in fields}) == 3 and len({f["LabelValue"] for f in fields}) == 3
    assert fields[0]["LabelValue"] == "3"  # the label keeps its atlas value; the union gets one of its own
    assert seg.GetMetaData("Segment0_Color") != seg.GetMetaData("Segment1_Color")  # and a colour of its own
    masks = segment_masks(tmp_path / "both.seg.nrrd")
    single, union = masks["Frontal_Sup_L"], masks["Frontal_Sup_L+Frontal_Sup_R"]
    assert seg.GetNumberOfComponentsPerPixel() == 2 and fields[0]["Layer"] != fields[1]["Layer"]  # overlap: 2 layers
    assert (single & union).sum() > 0.95 * single.sum() > 0  # the label lies inside the union, neither erased
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "both.csv"))}
    assert int(rows["Frontal_Sup_L"]["voxels"]) == single.sum() and int(rows["air"]["voxels"]) == 0
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "both.nii.gz")))
    assert set(np.unique(labelmap)) <= {0, 3, int(fields[1]["LabelValue"])}  # one label per voxel there
    code, _, err = run(["segment", subject / "scan.nrrd", "-o", tmp_path / "alone.seg.nrrd", "--labels", "Frontal_Sup_L",
                        "--checkpoint", tiny_checkpoint, "--volumes-csv", tmp_path / "alone.csv", "--quiet", "--device",
                        "cpu"], capsys)
    assert code == 0, err
    alone = int(next(csv.DictReader(open(tmp_path / "alone.csv")))["voxels"])
    assert abs(alone - single.sum()) <= 0.01 * alone  # the same volume whatever else was asked


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """A real DICOM series (one file per slice, position/orientation/spacing tags)."""
    folder.mkdir()
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 2000), sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.424242"
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in [("0008|0060", "MR"), ("0020|000e", series), ("0020|000d", series + ".1"),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.4f}"),
                           ("0028|0030", f"{image.GetSpacing()[1]:.4f}\\{image.GetSpacing()[0]:.4f}"),
                           ("0008|0018", f"{series}.{k + 1}")]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(s)


def test_dicom_folder_input(tiny_checkpoint, colin27, tmp_path, capsys):
    image, _ = heldout_subject(colin27, seed=41)
    image = sitk.Resample(image, model_grid(image, 3.0, 1), sitk.Transform(), sitk.sitkLinear, 0.0)
    write_dicom_series(image, tmp_path / "dicom")
    code, _, err = run(["segment", tmp_path / "dicom", "-o", tmp_path / "d.seg.nrrd", "--checkpoint", tiny_checkpoint,
                        "--labelmap", tmp_path / "d.nii.gz", "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    out = sitk.ReadImage(str(tmp_path / "d.nii.gz"))
    assert out.GetSize() == series.GetSize() and np.allclose(out.GetOrigin(), series.GetOrigin(), atol=1e-3)
    assert sitk.GetArrayViewFromImage(out).max() > 0


def test_painted_condition_is_segmented_under_its_name(tiny_checkpoint, colin27, subject, tmp_path, capsys):
    aal = sitk.ReadImage(str(colin27 / "labels/colin27.nii.gz"))
    region = sitk.GetArrayFromImage(aal) == 3  # Frontal_Sup_L, front half painted as a new label
    ys = np.nonzero(region)[1]
    region[:, : int(np.median(ys)), :] = False
    painted = sitk.GetImageFromArray(region.astype(np.uint8))
    painted.CopyInformation(aal)
    sitk.WriteImage(painted, str(tmp_path / "painted.nii.gz"))
    code, _, err = run(["segment", subject / "scan.nrrd", "-o", tmp_path / "p.seg.nrrd", "--checkpoint", tiny_checkpoint,
                        "--condition", tmp_path / "painted.nii.gz", "--name", "Frontal_Sup_L part", "--volumes-csv", tmp_path / "p.csv",
                        "--labelmap", tmp_path / "p.nii.gz", "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert rows[0]["name"] == "Frontal_Sup_L part" and int(rows[0]["value"]) == 100 and int(rows[0]["voxels"]) > 0
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz"))) == 100
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(subject / "truth.nrrd"))) == 3
    assert np.logical_and(found, truth).sum() / found.sum() > 0.4  # lies on the coarse structure it belongs to


def test_atlas_command_writes_what_to_paint_on_and_a_region_painted_on_it_is_segmented(tiny_checkpoint, tiny, subject,
                                                                                       tmp_path, capsys):
    """The CLI user's painted-region flow: `lcs atlas`, paint on its image (here: the front half of a label, saved on
    the atlas grid as an editor would), then `lcs segment --condition`."""
    slicer = pytest.importorskip("slicer")
    code, out, err = run(["atlas", "-o", tmp_path / "atlas", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0, err
    image = sitk.ReadImage(str(tmp_path / "atlas/atlas.nii.gz"))
    assert image.GetSize() == tiny.atlas_image.GetSize() and np.allclose(image.GetOrigin(), tiny.atlas_image.GetOrigin())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "atlas/atlas_labels.nii.gz")))
    assert np.array_equal(labels, sitk.GetArrayFromImage(tiny.atlas_labels))
    rows = list(csv.DictReader(open(tmp_path / "atlas/labels.csv")))
    assert [r["name"] for r in rows] == [label.name for label in tiny.label_table]
    scene = slicer.vtkMRMLScene()  # Slicer loads the labels as named segments to paint beside
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "atlas/atlas_labels.seg.nrrd"))
    assert storage.ReadData(node)
    names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(node.GetSegmentation().GetNumberOfSegments())]
    assert names == [label.name for label in tiny.label_table]
    region = labels == 3
    region[:, : int(np.median(np.nonzero(region)[1])), :] = False
    painted = sitk.GetImageFromArray(region.astype(np.uint8))
    painted.CopyInformation(image)
    sitk.WriteImage(painted, str(tmp_path / "region.nii.gz"))
    code, out, err = run(["segment", subject / "scan.nrrd", "-o", tmp_path / "r.seg.nrrd", "--checkpoint", tiny_checkpoint,
                          "--condition", tmp_path / "region.nii.gz", "--name", "front", "--quiet", "--device", "cpu"], capsys)
    assert code == 0 and "segmented 1 of 1 labels" in out, err
    code, out, err = run(["atlas", "-o", tmp_path / "atlas", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 2 and "already exists" in err


def test_labels_command_lists_the_atlas(tiny_checkpoint, capsys):
    code, out, _ = run(["labels", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0
    assert "6 labels" in out and "Frontal_Sup_L" in out and "\n85\tTemporal_Mid_L" in out
    # what its validation Dice measures, and where a user's figure comes from (README quotes lcs evaluate's)
    assert "validation Dice: the mean Dice of every label on the synthetic validation subjects" in out
    assert "lcs evaluate" in out


@pytest.mark.slow  # 5-8 s on 2 cores: the fast tier stays under 5 minutes; CI runs both
def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", str(tmp_path / "missing.nii.gz"),
                             "-o", str(tmp_path / "x.seg.nrrd")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lcs: error:") and "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--labels" in help_text.stdout and "--registration" in help_text.stdout


@pytest.mark.slow  # 5-8 s on 2 cores: the fast tier stays under 5 minutes; CI runs both
def test_messages_name_the_right_package_command_and_provenance(tiny_checkpoint, subject, tmp_path, capsys):
    import tomllib
    distribution = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
    no_monai = ("import sys; sys.modules['monai'] = None; from LabelConditionedSegLib.cli import main; "
                "sys.exit(main(['evaluate', '--subjects', '1']))")
    result = subprocess.run([sys.executable, "-c", no_monai], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "pip install monai scipy" in result.stderr, result.stderr  # what always works
    assert f"{distribution}[train]" not in result.stderr  # no package index has it
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", str(tmp_path / "empty"), "-o",
                             str(tmp_path / "e.seg.nrrd"), "--checkpoint", str(tiny_checkpoint)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "folder of DICOM files" in result.stderr, result.stderr
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(subject / "scan.nrrd"), "-o", str(tmp_path / "x.seg.nrrd"), "--lables", "Frontal_Sup_L"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: lcs segment" in err and "--lables" in err
    code, out, _ = run(["labels", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0 and "# iterations: 240" in out and "# labels_trained: 6" in out


@pytest.mark.parametrize("command", ["train", "pretrain", "relabel", "evaluate", "experiment", "benchmark"])
def test_every_option_of_the_training_commands_is_explained_and_quiet_exists(command):
    from LabelConditionedSegLib.cli import build_parser
    [commands] = [a for a in build_parser(command)._actions if a.dest == "command"]
    options = [a for a in commands.choices[command]._actions if a.option_strings and a.dest != "help"]
    assert "quiet" in {a.dest for a in options}
    assert [a.option_strings for a in options if not (a.help or "").strip()] == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_ends_saying_how_to_put_lcs_on_path(tmp_path):
    """After `make demo`, `lcs` lives in the Makefile's environment, not on PATH: the demo's last line says where it
    is and how to reach it (make's plan, -n: nothing is run)."""
    venv = tmp_path / "env"
    result = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "demo", f"VENV={venv}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert f"{venv}/bin/lcs" in last and f"source {venv}/bin/activate" in last and "PATH" in last, last


@pytest.mark.slow
def test_lcs_demo_segments_mni152_with_the_bundled_model(tmp_path, capsys):
    """`lcs demo`: the pip user's demo (what `make demo` runs): MNI152, every label, every output."""
    code, out, err = run(["demo", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert "segmented 116 of 116 labels" in out and "demo done" in out
    for name in ("mni152.seg.nrrd", "mni152_labels.nii.gz", "mni152_volumes.csv", "mni152_overlay.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
