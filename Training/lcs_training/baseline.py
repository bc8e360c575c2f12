"""The paper's multi-channel baseline at inference: one forward pass, one channel per label."""
from __future__ import annotations

import numpy as np
import torch

from LabelConditionedSegLib.model import LCSNet


@torch.no_grad()
def segment_multichannel(model: LCSNet, image: np.ndarray, values: list[int], device: str | torch.device,
                         threshold: float = 0.5) -> np.ndarray:
    """Label map on the model grid: each voxel takes its most probable channel's label, background below `threshold`
    (the same rule the LCS engine applies to its per-label probabilities)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    probabilities = torch.sigmoid(model.eval().to(device)(x).float())[0]
    best, index = probabilities.max(0)
    labels = np.asarray(values, np.int32)[index.cpu().numpy()]
    return np.where(best.cpu().numpy() >= threshold, labels, 0).astype(np.int32)
