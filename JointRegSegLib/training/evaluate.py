"""Validation metrics on a dataset's labelled validation pairs (working grid, no resampling)."""
from __future__ import annotations

import numpy as np
import torch

from ..qc import dice_per_label
from ..geometry import jacobian_determinant


def _labels_of(data, name):
    return data.labels.get(name, data.hidden_labels.get(name))


@torch.no_grad()
def evaluate_pairs(model, data, refine_iterations: int = 0) -> dict:
    net = model.network.eval()
    table = model.card["labels"]
    reg, seg, before, folding = [], [], [], []
    for pair in data.manifest["validation_pairs"]:
        m_name, f_name = pair["moving"], pair["fixed"]
        m, f = data.images[m_name], data.images[f_name]
        velocity = net.velocity(m, f)
        if refine_iterations:
            from ..refine import refine_velocity
            velocity = refine_velocity(net, velocity, m, f, refine_iterations)
        ddf = net.displacement(velocity, f.shape[2:])
        m_lab, f_lab = _labels_of(data, m_name), _labels_of(data, f_name)
        warped = net.warp_nearest(m_lab.float(), ddf).long()
        reg.append(np.nanmean(list(dice_per_label(warped.numpy()[0, 0], f_lab.numpy()[0, 0], table).values())))
        before.append(np.nanmean(list(dice_per_label(m_lab.numpy()[0, 0], f_lab.numpy()[0, 0], table).values())))
        pred = net.segment(f).argmax(1)
        seg.append(np.nanmean(list(dice_per_label(pred.numpy()[0], f_lab.numpy()[0, 0], table).values())))
        spacing = data.manifest["working_grid"]["spacing"]
        disp = ddf[0].numpy().transpose(1, 2, 3, 0)[..., ::-1] * np.array(spacing)
        import SimpleITK as sitk
        grid = sitk.Image(list(f.shape[2:][::-1]), sitk.sitkFloat32)
        grid.SetSpacing(spacing)
        folding.append(100.0 * float((jacobian_determinant(disp, grid) <= 0).mean()))
    return {"validation_pairs": len(reg), "registration_dice_mean": float(np.mean(reg)),
            "dice_before_registration": float(np.mean(before)), "segmentation_dice_mean": float(np.mean(seg)),
            "folding_percent_mean": float(np.mean(folding)), "refine_iterations": refine_iterations,
            "note": "mean Dice over the 8 structures, on the working grid; validation subjects are synthetic "
                    "variants of the two labelled anatomies"}
