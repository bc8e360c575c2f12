"""The `.lcs` checkpoint: everything needed to segment, nothing executable.

A torch zip file holding only tensors, strings and numbers, read back with
`torch.load(weights_only=True)`, so a file posing as a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import LCSError
from .files import atomic_path
from .labels import LabelTable
from .model import LCSNet, ModelConfig

FORMAT = "label-conditioned-segmentation"
VERSION = 1


def _bundled() -> Path:
    """demo.lcs as package data (pip install: LabelConditionedSegLib/Models, mapped from Resources/Models
    in pyproject.toml), beside the package (a built Slicer extension) or at the repository's top (a source
    tree, also an editable install)."""
    here = Path(__file__).resolve()
    candidates = [here.parent / "Models" / "demo.lcs",
                  *(root / "Resources" / "Models" / "demo.lcs" for root in (here.parents[1], here.parents[2]))]
    return next((p for p in candidates if p.exists()), candidates[-1])


BUNDLED = _bundled()


def default_checkpoint() -> Path:
    """$LCS_CHECKPOINT, else the bundled demo model."""
    return Path(os.environ.get("LCS_CHECKPOINT", BUNDLED))


def _first_words(text: str, width: int = 120) -> str:
    """The first line of an error, cut at a word boundary when long ("... the `weights_only` ...")."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return textwrap.shorten(line, width, placeholder=" ...")


@dataclass
class Checkpoint:
    """A trained model with its atlas (image, label map, brain mask on the model grid) and label table.

    atlas_image is already intensity-normalized; provenance records data, labels trained,
    iterations, validation Dice and date.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    atlas_image: sitk.Image
    atlas_labels: sitk.Image
    atlas_mask: sitk.Image
    label_table: LabelTable
    normalization: dict = field(default_factory=lambda: {"method": "percentile-in-atlas-mask", "low": 0.5, "high": 99.5})
    provenance: dict = field(default_factory=dict)

    def build_model(self) -> LCSNet:
        model = LCSNet(self.config)
        model.load_state_dict(self.weights)
        return model.eval()

    @property
    def priors(self) -> list[str]:
        """The atlas priors the network was trained to refine: "affine" (the atlas as it is, the paper's), and
        "deformable" when it also saw atlases warped close to the subject (--registration deformable)."""
        return list(self.provenance.get("priors", ["affine"]))

    @property
    def description(self) -> str:
        p = self.provenance
        dice, by_prior = p.get("validation_dice"), p.get("validation_dice_by_prior") or {}
        shown = (", validation Dice " + ", ".join(f"{k} {v:.3f}" for k, v in by_prior.items()) if len(by_prior) > 1 else
                 f", validation Dice {dice:.3f}" if dice is not None else "")
        return f"{p.get('name', 'LCS model')}: {len(self.label_table)} labels, {p.get('iterations', '?')} iterations{shown}"

    def save(self, path: str | Path) -> None:
        metadata = {
            "config": self.config.to_dict(),
            "labels": self.label_table.to_rows(),
            "grid": {"spacing": self.atlas_image.GetSpacing(), "origin": self.atlas_image.GetOrigin(),
                     "direction": self.atlas_image.GetDirection()},
            "normalization": self.normalization,
            "provenance": self.provenance,
        }
        contents = {
            "format": FORMAT, "version": VERSION, "metadata": json.dumps(metadata),
            "weights": {k: v.detach().cpu().clone() for k, v in self.weights.items()},
            "atlas_image": torch.from_numpy(sitk.GetArrayFromImage(self.atlas_image)).half(),
            "atlas_labels": torch.from_numpy(sitk.GetArrayFromImage(self.atlas_labels).astype(np.int32)),
            "atlas_mask": torch.from_numpy(sitk.GetArrayFromImage(self.atlas_mask).astype(np.uint8)),
        }
        with atomic_path(path) as temporary:  # a crash or kill mid-save leaves the previous file
            torch.save(contents, str(temporary))

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.is_file():
            from_environment = os.environ.get("LCS_CHECKPOINT") and Path(os.environ["LCS_CHECKPOINT"]) == path
            raise LCSError(f"checkpoint {path} does not exist; give the path of a .lcs file" + (
                " (this path comes from $LCS_CHECKPOINT: correct it, or unset it to use the bundled model)"
                if from_environment else ""))
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # pickle refusals, zip errors, truncation: all mean "not a checkpoint"
            reason = _first_words(str(error)) or type(error).__name__
            raise LCSError(f"{path} is not a valid LCS checkpoint and was not loaded ({reason})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise LCSError(f"{path} is not an LCS checkpoint (no '{FORMAT}' marker)")
        if raw.get("version") != VERSION:
            raise LCSError(f"{path} has checkpoint format version {raw.get('version')}; this lcs reads version {VERSION}")
        try:
            meta = json.loads(raw["metadata"])
            config = ModelConfig(**meta["config"])
            grid = meta["grid"]

            def image(array: np.ndarray) -> sitk.Image:
                img = sitk.GetImageFromArray(array)
                img.SetSpacing(grid["spacing"]); img.SetOrigin(grid["origin"]); img.SetDirection(grid["direction"])
                return img

            checkpoint = cls(config, dict(raw["weights"]), image(raw["atlas_image"].float().numpy()),
                             image(raw["atlas_labels"].numpy()), image(raw["atlas_mask"].numpy()),
                             LabelTable.from_rows(meta["labels"]), meta["normalization"], meta["provenance"])
            checkpoint.build_model()
        except LCSError:
            raise
        except Exception as error:
            raise LCSError(f"{path} is a damaged LCS checkpoint ({type(error).__name__}: {_first_words(str(error))})") from None
        if any(s % config.factor for s in checkpoint.atlas_image.GetSize()):
            raise LCSError(f"{path} is a damaged LCS checkpoint (grid not a multiple of {config.factor})")
        return checkpoint
