"""Adversarial semi-supervised training on label crops (the DeepLab-adversarial paper in ../shared/papers, after
Hung et al. 2018), for `lcs train --adversarial`.

A fully convolutional discriminator sees (image, probability map of the conditioned label, atlas label) and says,
voxel by voxel, whether the map is ground truth. Labelled crops train it (ground truth real, predictions fake) and
give the segmenter lambda_adv x the adversarial BCE; unlabelled crops, with the discriminator frozen, give the
segmenter lambda_unlabelled x that BCE alone, and optionally Hung et al.'s self-training: where the discriminator
trusts the prediction (above a threshold), the thresholded prediction is a target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .smile import masked_bce_loss

SELF_TRAINING_WEIGHT = 0.1  # Hung et al.'s lambda_semi


class Discriminator(nn.Module):
    """(image, probability, atlas label) crops -> one logit per voxel that the probability map is ground truth.

    Hung et al.'s design in 3D and smaller: four stride-2 convolutions (c, 2c, 4c, 8c channels, LeakyReLU 0.2), a
    one-channel classifier, and trilinear upsampling back to the crop's size."""

    def __init__(self, channels: int = 8):
        super().__init__()
        layers, cin = [], 3
        for c in (channels, 2 * channels, 4 * channels, 8 * channels):
            layers += [nn.Conv3d(cin, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            cin = c
        layers.append(nn.Conv3d(cin, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, probability: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, probability, condition], 1)
        return F.interpolate(self.layers(x), size=x.shape[2:], mode="trilinear", align_corners=False)


def generator_loss(discriminator: nn.Module, images: list[torch.Tensor], logits: list[torch.Tensor],
                   conditions: list[torch.Tensor], weights: list[torch.Tensor], scale: float,
                   self_training: float = 0.0) -> torch.Tensor:
    """scale x the BCE that the discriminator takes these predictions for ground truth (the segmenter's adversarial
    loss), plus, with a self_training threshold, SELF_TRAINING_WEIGHT x the BCE to the thresholded prediction where
    the discriminator's confidence exceeds it. The discriminator's weights receive no gradient from this loss."""
    was = [p.requires_grad for p in discriminator.parameters()]
    discriminator.requires_grad_(False)
    try:
        losses = []
        for image, logit, condition, weight in zip(images, logits, conditions, weights):
            judged = discriminator(image, torch.sigmoid(logit), condition)
            loss = scale * masked_bce_loss(judged, torch.ones_like(judged), weight)
            if self_training > 0:
                trusted = (torch.sigmoid(judged) > self_training).float().detach() * weight
                pseudo = (logit > 0).float().detach()
                loss = loss + SELF_TRAINING_WEIGHT * masked_bce_loss(logit, pseudo, trusted)
            losses.append(loss)
        return torch.stack(losses).mean()
    finally:
        for parameter, flag in zip(discriminator.parameters(), was):
            parameter.requires_grad_(flag)


class DiscriminatorLoss(nn.Module):
    """The discriminator's BCE on labelled crops: ground truth is real, the segmenter's predictions (detached: the
    segmenter learns nothing here) are fake. A crop of a label its case does not annotate (SMILE's weight not 1
    everywhere) is left out: its truth is incomplete and would teach that incomplete maps are real. (It still runs,
    with weight 0, so every process of a distributed run uses the discriminator alike.) A module holding the
    discriminator, so that DistributedDataParallel wraps the whole loss in one forward."""

    def __init__(self, discriminator: Discriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, images: list[torch.Tensor], logits: list[torch.Tensor], targets: list[torch.Tensor],
                conditions: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
        losses = []
        for image, logit, target, condition, weight in zip(images, logits, targets, conditions, weights):
            weight = weight if bool(weight.min() > 0) else torch.zeros_like(weight)
            real = self.discriminator(image, target, condition)
            fake = self.discriminator(image, torch.sigmoid(logit.detach()), condition)
            losses.append(masked_bce_loss(real, torch.ones_like(real), weight)
                          + masked_bce_loss(fake, torch.zeros_like(fake), weight))
        return torch.stack(losses).mean()
