"""`make demo`: segment a real brain that is not the atlas (nilearn's MNI152 2009 T1) with the bundled model."""
from __future__ import annotations

import sys
from pathlib import Path

import SimpleITK as sitk

from LabelConditionedSegLib.cli import main as lcs
from LabelConditionedSegLib.files import atomic_path


def write_mni152(path: Path) -> Path:
    """nilearn ships the MNI152 2009 template (1 mm, skull-stripped): a second real brain to segment."""
    from nilearn.datasets import load_mni152_template
    image = load_mni152_template(resolution=1)
    with atomic_path(path) as temporary:
        image.to_filename(str(temporary))
    sitk.ReadImage(str(path))  # fail here, not later, if the file is unreadable
    return path


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scan = write_mni152(out / "mni152.nii.gz")
    code = lcs(["segment", str(scan), "-o", str(out / "mni152.seg.nrrd"), "--all", "--labelmap", str(out / "mni152_labels.nii.gz"),
                "--volumes-csv", str(out / "mni152_volumes.csv"), "--overlay", str(out / "mni152_overlay.png"), "--overwrite"])
    if code == 0:
        print(f"demo done: open {out}/mni152_overlay.png, or load {scan} and {out}/mni152.seg.nrrd in 3D Slicer")
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")))
