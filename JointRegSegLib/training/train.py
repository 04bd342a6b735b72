"""The training loop shared by every strategy: pretrain registration, pretrain segmentation, then
alternate (DeepAtlas, Xu & Niethammer, MICCAI 2019). Strategies supply the losses."""
from __future__ import annotations

import copy
import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from ..checkpoint import load_model, new_model, save_model
from ..device import resolve_device
from ..progress import Reporter
from .dataset import FewShotData, load_fewshot


class JointLosses:
    """DeepAtlas losses. Registration (Eq. 1): -LNCC + w_smooth * diffusion(ddf) + w_anatomy * Dice(warped
    moving seg, fixed seg), with predicted segmentations where a manual one is missing. Segmentation
    (Eq. 2): w_supervised * Dice on labelled images + w_anatomy * Dice(seg(fixed), warped moving labels)."""

    def __init__(self, weights: dict):
        self.w = weights
        self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)
        self.smooth = DiffusionLoss()
        self.dice = DiceLoss(include_background=False)

    def registration(self, net, data: FewShotData, moving: str, fixed: str, use_predicted: bool) -> dict:
        m, f = data.images[moving], data.images[fixed]
        ddf = net.displacement(net.velocity(m, f), f.shape[2:])
        terms = {"similarity": self.similarity(net.warp(m, ddf), f), "smooth": self.smooth(ddf)}
        seg_m, seg_f = self.segmentation_or_label(net, data, moving, use_predicted), \
            self.segmentation_or_label(net, data, fixed, use_predicted)
        if seg_m is not None and seg_f is not None:
            terms["anatomy"] = self.dice(net.warp(seg_m, ddf), seg_f)
        total = (self.w["similarity"] * terms["similarity"] + self.w["smooth"] * terms["smooth"]
                 + self.w["anatomy"] * terms.get("anatomy", 0.0))
        return {"loss": total, **terms}

    @staticmethod
    def segmentation_or_label(net, data, name, use_predicted):
        if name in data.labels:
            return data.onehot(data.labels[name])
        if not use_predicted:
            return None
        with torch.no_grad():
            return torch.softmax(net.segment(data.images[name]), dim=1)

    def segmentation(self, net, data: FewShotData, labelled: str, other: str) -> dict:
        """Supervised Dice on `labelled` plus the anatomy term on `other` from warped labels."""
        terms = {"supervised": self.dice(torch.softmax(net.segment(data.images[labelled]), 1),
                                         data.onehot(data.labels[labelled]))}
        with torch.no_grad():
            m, f = data.images[labelled], data.images[other]
            ddf = net.displacement(net.velocity(m, f), f.shape[2:])
            warped_labels = net.warp(data.onehot(data.labels[labelled]), ddf)
        terms["anatomy"] = self.dice(torch.softmax(net.segment(f), 1), warped_labels)
        total = self.w["supervised"] * terms["supervised"] + self.w["anatomy"] * terms["anatomy"]
        return {"loss": total, **terms}


def default_card(config: dict, data: FewShotData) -> dict:
    return {
        "name": config["name"], "description": config.get("description", ""),
        "architecture": config["architecture"], "labels": data.manifest["label_table"],
        "modality": data.manifest.get("modality", "unknown"), "intensity": config["intensity"],
        "working_grid": {**data.manifest["working_grid"], "center": "mass"},
        "segment_foreground_only": bool(config.get("segment_foreground_only", False)),
        "refinement": config.get("refinement", {"similarity": "lncc", "smoothness": 1.0, "learning_rate": 0.05}),
    }


def _schedule(config: dict) -> list[tuple[str, int]]:
    """(phase, step) for every step: registration pretraining, segmentation pretraining, then joint
    training with one segmentation step per `seg_every` registration steps (DeepAtlas: 1:20)."""
    steps = config["steps"]
    plan = [("reg_pretrain", i) for i in range(steps["reg_pretrain"])]
    plan += [("seg_pretrain", i) for i in range(steps["seg_pretrain"])]
    every = int(config.get("seg_every", 20))
    for i in range(steps["joint"]):
        plan.append(("joint_reg", i))
        if (i + 1) % every == 0:
            plan.append(("joint_seg", i))
    return plan


def train(config: dict, data_dir, out_path, init=None, device="auto", progress=None, cancel=None) -> Path:
    """Train (or fine-tune from `init`) and write a checkpoint with its model card to `out_path`.

    Resumable: every `checkpoint_every` steps `<out>.partial.safetensors` and `<out>.state.json` are
    written; a later call with the same arguments continues from there.
    """
    out_path = Path(out_path)
    reporter = Reporter(progress, cancel)
    dev = resolve_device(device)
    seed = int(config.get("seed", 0))
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    data = load_fewshot(data_dir, config["intensity"], dev)
    if not data.labelled:
        from ..errors import JointRegSegError
        raise JointRegSegError(f"{data_dir}: no labelled training image; joint training needs at least one")
    partial = out_path.with_suffix(".partial.safetensors")
    state_path = out_path.with_suffix(".state.json")
    start = 0
    if partial.is_file() and state_path.is_file():
        model = load_model(partial, dev)
        start = json.loads(state_path.read_text())["next_step"]
    elif init is not None:
        model = load_model(init, dev)
        model.card = {**model.card, "parent": {"name": model.card.get("name"), "path": str(init),
                                               "weights_sha256": model.card.get("weights_sha256")}}
        model.card.update({k: v for k, v in default_card(config, data).items() if k not in ("architecture",)})
    else:
        model = new_model(default_card(config, data), seed=seed)
    net = model.network.to(dev).train()
    losses = JointLosses(config["weights"])
    lr = config["lr"]
    reg_params = list(net.registration.parameters())
    seg_params = list(net.segmentation.parameters())
    optimizers = {"reg_pretrain": torch.optim.Adam(reg_params, lr=lr["reg_pretrain"]),
                  "seg_pretrain": torch.optim.Adam(seg_params, lr=lr["seg_pretrain"]),
                  "joint_reg": torch.optim.Adam(reg_params, lr=lr["reg"]),
                  "joint_seg": torch.optim.Adam(seg_params, lr=lr["seg"])}
    plan = _schedule(config)
    log_path = out_path.with_suffix(".log.csv")
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if start == 0:
        writer.writerow(["step", "phase", "loss", "similarity", "smooth", "anatomy", "supervised", "seconds"])
    rng = random.Random(seed + start)
    began = time.perf_counter()
    try:
        for step in range(start, len(plan)):
            phase, _ = plan[step]
            if phase in ("reg_pretrain", "joint_reg"):
                moving, fixed = rng.sample(data.train, 2)
                terms = losses.registration(net, data, moving, fixed, use_predicted=phase == "joint_reg")
            else:
                labelled = rng.choice(data.labelled)
                other = rng.choice([n for n in data.train if n != labelled])
                terms = losses.segmentation(net, data, labelled, other)
            optimizer = optimizers[phase]
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            writer.writerow([step, phase] + [f"{float(terms[k].detach() if torch.is_tensor(terms[k]) else terms[k]):.5f}" if k in terms else "" for k in
                                             ("loss", "similarity", "smooth", "anatomy", "supervised")]
                            + [f"{time.perf_counter() - began:.1f}"])
            reporter.update(f"train {phase}", (step + 1) / len(plan))
            if (step + 1) % int(config.get("checkpoint_every", 100)) == 0:
                log.flush()
                save_model(model, partial)
                state_path.write_text(json.dumps({"next_step": step + 1, "of": len(plan)}))
    finally:
        log.close()
    net.eval()
    from .evaluate import evaluate_pairs
    model.card["training"] = {
        "strategy": config["strategy"], "config": copy.deepcopy(config),
        "seconds_this_run": round(time.perf_counter() - began, 1), "device": str(dev),
        "labelled_images": data.labelled, "unlabelled_images": len(data.train) - len(data.labelled),
        "paper": "Xu & Niethammer, DeepAtlas: Joint Semi-supervised Learning of Image Registration and "
                 "Segmentation, MICCAI 2019",
    }
    model.card["data"] = {"folder": str(data_dir), "sources": data.manifest["sources"],
                          "notes": data.manifest["notes"], "seed": data.manifest["seed"]}
    model.card["metrics"] = evaluate_pairs(model, data)
    save_model(model, out_path)
    partial.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    return out_path
