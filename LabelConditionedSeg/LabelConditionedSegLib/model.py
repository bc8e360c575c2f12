"""The LCS 3D U-Net (Ma, Lee and Sabuncu, MIDL 2022).

One encoder pass per volume, one decoder pass per label: the atlas image and the
binary atlas label are pooled to the bottleneck grid and concatenated there, so
the same weights segment whichever label the atlas mask names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "group", "none")
CONDITION_LEVELS = ("bottleneck", "all")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an LCS network; stored in every checkpoint.

    condition_levels: "bottleneck" is the paper (atlas at 1/2**depth only);
    "all" also gives the decoder the atlas at every scale (an experiment).
    norm: "batch" keeps inference independent of the decoded region
    (eval-mode statistics), which region-restricted decoding relies on.
    baseline_labels: K > 0 builds the paper's multi-channel baseline instead: the
    same U-Net without the atlas input, with K output channels (one per label).
    prior_weight: w > 0 adds w * signed_depth(atlas mask, r) / r to the logits, w learned from this start and the
    last convolution starting at zero: an untrained network outputs its atlas prior, and training learns what to
    change in it (0: the paper's network, which learns the prior's role from nothing).
    prior_radius: r, in voxels: the prior is sure (|logit| = w) r voxels from the mask's boundary and unsure (w / r)
    next to it, where the network's corrections belong; 1 gives w * (2 * mask - 1), a prior sure everywhere.
    """

    base_channels: int = 8
    depth: int = 4
    norm: str = "batch"
    condition_levels: str = "bottleneck"
    dropout: float = 0.0
    baseline_labels: int = 0
    prior_weight: float = 0.0
    prior_radius: int = 1

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {self.norm!r}")
        if self.condition_levels not in CONDITION_LEVELS:
            raise ValueError(f"condition_levels must be one of {CONDITION_LEVELS}")
        if self.depth < 1 or self.base_channels < 1 or self.prior_radius < 1:
            raise ValueError("depth, base_channels and prior_radius must be positive")
        if self.baseline_labels < 0 or self.prior_weight < 0:
            raise ValueError("baseline_labels and prior_weight must not be negative")

    @property
    def conditioned(self) -> bool:
        """An LCS network (atlas-conditioned, one output), not the multi-channel baseline."""
        return self.baseline_labels == 0

    @property
    def factor(self) -> int:
        """Grid sizes must be multiples of this (2**depth)."""
        return 2**self.depth

    @property
    def region_invariant(self) -> bool:
        """True when decoding a crop gives the same voxels as decoding the whole grid."""
        return self.norm in ("batch", "none")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(4, channels), channels)
    return nn.Identity()


class Conv3d(nn.Conv3d):
    """nn.Conv3d that gives one volume with few channels to oneDNN on the CPU too, at inference.

    PyTorch sends a single volume whose channels x first two axes hold under 20,480 voxels to its reference kernel,
    7-12x slower than oneDNN's on the decoder's coarse levels (measured, 2 cores): most labels' boxes are that small
    there. The same weights, the same state dict; training and other devices take the usual path."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple) and torch.backends.mkldnn.enabled
                and torch.backends.mkldnn.is_available()):
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class ConvBlock(nn.Sequential):
    """3x3x3 convolution, normalization, LeakyReLU (one per scale, as in the paper)."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float = 0.0):
        layers = [Conv3d(cin, cout, 3, padding=1), _norm(norm, cout), nn.LeakyReLU(0.1, inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)


class LCSNet(nn.Module):
    """3D U-Net with single-channel output conditioned on (atlas image, atlas mask).

    encode(image) -> list of feature maps, finest first (label independent).
    decode(features, atlas_image, atlas_mask) -> logits, one channel.
    The atlas tensors are on the full-resolution grid, shape (B, 1, D, H, W), and
    are pooled here; features may be repeated or cropped along the batch for many labels.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        c = [config.base_channels * 2**i for i in range(config.depth + 1)]
        n, p = config.norm, config.dropout
        self.down = nn.ModuleList([ConvBlock(1, c[0], n)] + [ConvBlock(c[i - 1], c[i], n) for i in range(1, config.depth + 1)])
        atlas = 2 if config.conditioned else 0  # atlas image + mask channels
        extra = atlas if config.condition_levels == "all" else 0
        self.bottleneck = ConvBlock(c[-1] + atlas, c[-1], n, p)
        self.upsample = nn.ModuleList([nn.ConvTranspose3d(c[i + 1], c[i], 2, stride=2) for i in range(config.depth)])
        self.up = nn.ModuleList([ConvBlock(2 * c[i] + extra, c[i], n, p) for i in range(config.depth)])
        self.head = Conv3d(c[0], config.baseline_labels or 1, 1)
        if config.conditioned and config.prior_weight > 0:
            self.prior_weight = nn.Parameter(torch.tensor(float(config.prior_weight)))
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = [self.down[0](image)]
        for block in self.down[1:]:
            features.append(block(F.max_pool3d(features[-1], 2)))
        return features

    def decode(self, features: list[torch.Tensor], atlas_image: torch.Tensor | None = None,
               atlas_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: one channel for LCS (the atlas tensors are required), K for the baseline (they are not used)."""
        atlas = self._atlas_pyramid(atlas_image, atlas_mask) if self.config.conditioned else None
        x = self.bottleneck(torch.cat([features[-1], atlas[-1]], 1) if atlas else features[-1])
        for level in reversed(range(self.config.depth)):
            parts = [self.upsample[level](x), features[level]]
            if atlas and self.config.condition_levels == "all":
                parts.append(atlas[level])
            x = self.up[level](torch.cat(parts, 1))
        if atlas and self.config.prior_weight > 0:
            radius = self.config.prior_radius
            return self.head(x) + self.prior_weight / radius * signed_depth(atlas_mask, radius)
        return self.head(x)

    def forward(self, image: torch.Tensor, atlas_image: torch.Tensor | None = None,
                atlas_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(image), atlas_image, atlas_mask)

    def _atlas_pyramid(self, atlas_image: torch.Tensor, atlas_mask: torch.Tensor) -> list[torch.Tensor]:
        """Atlas at each scale: image by average pooling, mask by max pooling (small labels survive)."""
        pyramid = [torch.cat([atlas_image, atlas_mask], 1)]
        for _ in range(self.config.depth):
            image, mask = F.avg_pool3d(pyramid[-1][:, :1], 2), F.max_pool3d(pyramid[-1][:, 1:], 2)
            pyramid.append(torch.cat([image, mask], 1))
        return pyramid


def signed_depth(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """+k on voxels of a binary mask k voxels deep, -k outside k voxels from it (chessboard distance, capped at
    `radius`); radius 1 gives 2 * mask - 1. Repeated erosions of the mask and of its background."""
    inside, outside = mask, 1 - mask
    depth = inside - outside
    for _ in range(radius - 1):
        inside, outside = erode(inside), erode(outside)
        depth = depth + inside - outside
    return depth


def erode(x: torch.Tensor) -> torch.Tensor:
    """Minimum over each voxel's 3x3x3 cube (within the tensor), one axis at a time, in place on a copy: the cube's
    minimum is the minimum of three 1D minima, and shifted views cost a twelfth of a 3D min-pooling on a CPU.
    For masks (no gradient)."""
    for dim in (2, 3, 4):
        n, out = x.shape[dim], x.clone()
        torch.minimum(out.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), out=out.narrow(dim, 1, n - 1))
        torch.minimum(out.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), out=out.narrow(dim, 0, n - 1))
        x = out
    return x
