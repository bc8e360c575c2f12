"""`lcs` end to end on real files, and one clear line (exit 2, no traceback) for every bad input."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

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
    assert np.array_equal(sitk.GetArrayFromImage(seg), p)
    rows = list(csv.DictReader(open(out / "v.csv")))
    assert [r["name"] for r in rows] == TINY_LABELS and all(float(r["volume_ml"]) > 1 for r in rows)
    assert (out / "overlay.png").read_bytes()[:4] == b"\x89PNG"
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
    image, _ = heldout_subject(colin27, seed=41, grid="atlas")
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


def test_labels_command_lists_the_atlas(tiny_checkpoint, capsys):
    code, out, _ = run(["labels", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 0
    assert "6 labels" in out and "Frontal_Sup_L" in out and "\n85\tTemporal_Mid_L" in out


def image_file(tmp_path: Path, name: str, array: np.ndarray, vector: bool = False) -> Path:
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def bad_inputs(tmp_path: Path, subject: Path, checkpoint: Path):
    noise = np.random.default_rng(0).random((20, 24, 20)).astype(np.float32)
    nan, inf = noise.copy(), noise.copy()
    nan[3, 4, 5], inf[1, 1, 1] = np.nan, np.inf
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    hostile = tmp_path / "hostile.lcs"

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"format": "label-conditioned-segmentation", "x": Payload()}, hostile)
    corrupt = tmp_path / "corrupt.lcs"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    existing = tmp_path / "existing.seg.nrrd"
    existing.write_text("keep me")
    scan = subject / "scan.nrrd"
    out = tmp_path / "o.seg.nrrd"
    return [
        ([image_file(tmp_path, "flat.nii.gz", noise[0])], "2D"),
        ([image_file(tmp_path, "series.nii.gz", np.stack([noise] * 3))], "4D"),
        ([image_file(tmp_path, "rgb.nrrd", np.stack([noise] * 3, -1), vector=True)], "values per voxel"),
        ([image_file(tmp_path, "zeros.nii.gz", np.zeros((20, 24, 20), np.float32))], "empty"),
        ([image_file(tmp_path, "const.nii.gz", np.full((20, 24, 20), 7, np.float32))], "constant"),
        ([image_file(tmp_path, "nan.mha", nan)], "NaN"),
        ([image_file(tmp_path, "inf.mha", inf)], "infinite"),
        ([text], "cannot read"),
        ([tmp_path / "nowhere.nii.gz"], "does not exist"),
        ([scan, "--labels", "Hippocampus_Q"], "not in the atlas"),
        ([scan, "--checkpoint", tmp_path / "none.lcs"], "does not exist"),
        ([scan, "--checkpoint", corrupt], "not a valid LCS checkpoint"),
        ([scan, "--checkpoint", hostile], "not a valid LCS checkpoint"),
        ([scan, "--device", "cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"], "cuda:7" if not torch.cuda.is_available() else "does not exist"),
        ([scan, "--device", "gpu"], "not known"),
        ([scan, "-o", existing], "already exists"),
        ([scan, "-o", text / "sub" / "x.seg.nrrd"], "not a writable folder"),
        ([scan, "-o", tmp_path / "x.png"], ".seg.nrrd"),
        ([scan, "--condition", text], "give one --name"),
        ([scan, "--threshold", "1.5"], "threshold"),
    ], out, existing, tmp_path / "pwned"


def test_bad_inputs_get_one_clear_line_and_exit_2(tiny_checkpoint, subject, tmp_path, capsys):
    cases, out, existing, marker = bad_inputs(tmp_path, subject, tiny_checkpoint)
    for args, message in cases:
        argv = ["segment", *args]
        if "-o" not in args:
            argv += ["-o", out]
        if "--checkpoint" not in args:
            argv += ["--checkpoint", tiny_checkpoint]
        code, _, err = run(argv + ["--quiet"], capsys)
        assert code == 2, (args, err)
        assert err.startswith("lcs: error:") and err.count("\n") == 1, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err
    assert existing.read_text() == "keep me"
    assert not out.exists()
    assert not marker.exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", str(tmp_path / "missing.nii.gz"),
                             "-o", str(tmp_path / "x.seg.nrrd")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lcs: error:") and "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--labels" in help_text.stdout and "--registration" in help_text.stdout
