"""Segmentation loss for sources that label only some classes (partial-label training).

A voxel with a class the source defines is supervised on that class; a brain voxel without one may be any
foreground class the source does not define (the marginal likelihood over those classes, as in the
marginal loss of Shi et al., MedIA 2021), so a source without, say, white matter never teaches background
or another structure there; a voxel outside the brain is background for every source. Soft Dice on the
brain (the union of foreground classes: the brain mask) for every source and on each class the source
defines, so small structures count as much as large ones.
"""
from __future__ import annotations

import torch


def _soft_dice(probability: torch.Tensor, truth: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    overlap = (probability * truth).sum()
    return 1 - (2 * overlap + smooth) / (probability.sum() + truth.sum() + smooth)


def partial_label_loss(logits: torch.Tensor, target: torch.Tensor, brain: torch.Tensor, known) -> torch.Tensor:
    """logits (1, C, z, y, x); target (1, 1, z, y, x) long (0 = no known class); brain (1, 1, z, y, x) bool;
    known: the class values the source defines (may be empty)."""
    classes = logits.shape[1]
    log_p = torch.log_softmax(logits, 1)
    known_mask = torch.zeros(classes, dtype=torch.bool, device=logits.device)
    known_mask[list(known)] = True
    known_mask[0] = False
    t = target[:, 0].clamp(0, classes - 1)
    inside = brain[:, 0]
    labelled = inside & (t > 0) & known_mask[t]
    open_classes = ~known_mask
    open_classes[0] = False
    if not bool(open_classes.any()):          # every class defined: an unlabelled brain voxel is "some structure"
        open_classes = torch.ones(classes, dtype=torch.bool, device=logits.device)
        open_classes[0] = False
    nll_labelled = -log_p.gather(1, t[:, None])[:, 0]
    nll_open = -torch.logsumexp(log_p[:, open_classes], 1)
    nll_background = -log_p[:, 0]
    cross_entropy = torch.where(labelled, nll_labelled, torch.where(inside, nll_open, nll_background)).mean()
    p = log_p.exp()
    dice = [_soft_dice(1 - p[:, 0], inside.float())]
    dice += [_soft_dice(p[:, c], (labelled & (t == c)).float()) for c in known if 0 < c < classes]
    return cross_entropy + torch.stack(dice).mean()
