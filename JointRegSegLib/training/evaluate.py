"""Validation metrics on a dataset's labelled validation pairs (working grid, no resampling)."""
from __future__ import annotations

import numpy as np
import torch

from ..core.geometry import jacobian_determinant, make_grid, voxel_ddf_to_mm
from ..inference.qc import dice_per_label
from ..inference.refine import refine_velocity


def _mean_dice(a: torch.Tensor, b: torch.Tensor, table) -> float:
    return float(np.nanmean(list(dice_per_label(a.numpy().squeeze(), b.numpy().squeeze(), table).values())))


def _labels_of(data, name):
    return data.labels.get(name, data.hidden_labels.get(name))


@torch.no_grad()
def evaluate_pairs(model, data, refine_iterations: int = 0) -> dict:
    net = model.network.eval()
    table = model.card["labels"]
    grid_spec = data.manifest["working_grid"]
    grid = make_grid(grid_spec["size"], grid_spec["spacing"], np.array(grid_spec["direction"]).reshape(3, 3),
                     np.zeros(3))
    reg, seg, before, folding = [], [], [], []
    for pair in data.manifest["validation_pairs"]:
        m_name, f_name = pair["moving"], pair["fixed"]
        m, f = data.images[m_name], data.images[f_name]
        velocity = net.velocity(m, f)
        if refine_iterations:
            velocity = refine_velocity(net, velocity, m, f, refine_iterations)
        ddf = net.displacement(velocity, f.shape[2:])
        m_lab, f_lab = _labels_of(data, m_name), _labels_of(data, f_name)
        warped = net.warp_nearest(m_lab.float(), ddf).long()
        reg.append(_mean_dice(warped, f_lab, table))
        before.append(_mean_dice(m_lab, f_lab, table))
        seg.append(_mean_dice(net.segment(f).argmax(1), f_lab, table))
        displacement_mm = voxel_ddf_to_mm(ddf[0].numpy(), grid)
        folding.append(100.0 * float((jacobian_determinant(displacement_mm, grid) <= 0).mean()))
    return {"validation_pairs": len(reg), "registration_dice_mean": float(np.mean(reg)),
            "dice_before_registration": float(np.mean(before)), "segmentation_dice_mean": float(np.mean(seg)),
            "folding_percent_mean": float(np.mean(folding)), "refine_iterations": refine_iterations,
            "note": validation_note(data, table)}


def validation_note(data, table) -> str:
    """What the validation figures measure, read from the manifest: how many structures, and whether the
    validation subjects share an anatomy with training (then the figures are optimistic for unseen brains)."""
    items = {e["name"]: e for e in data.manifest.get("items", [])}
    source = lambda name: items.get(name, {}).get("source", "unknown")  # noqa: E731
    names = {n for pair in data.manifest["validation_pairs"] for n in (pair["moving"], pair["fixed"])}
    val_sources = sorted({source(n) for n in names})
    train_sources = {source(n) for n in data.train}
    shared = [s for s in val_sources if s in train_sources]
    structures = sum(int(e["value"]) != 0 for e in table)
    text = (f"mean Dice over the {structures} structures of the label table, on the working grid; validation "
            f"subjects come from {', '.join(val_sources)}")
    if shared:
        return (f"{text}, anatomies that training also used ({', '.join(shared)}): these figures do not measure "
                "generalisation to unseen anatomy")
    return f"{text}, anatomies held out of training"
