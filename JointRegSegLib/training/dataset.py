"""A dataset folder (from `jointregseg data build`) loaded as normalised tensors on its working grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..data.dataset_format import load_manifest
from ..core.geometry import to_tensor
from ..core.intensity import normalize


@dataclass
class FewShotData:
    manifest: dict
    images: dict          # name -> (1, 1, z, y, x) normalised
    labels: dict          # name -> (1, 1, z, y, x) long, only for items whose labels may be used
    hidden_labels: dict   # name -> labels kept for evaluation only
    train: list
    val: list

    @property
    def labelled(self) -> list:
        return [n for n in self.train if n in self.labels]

    @property
    def num_classes(self) -> int:
        return max(e["value"] for e in self.manifest["label_table"]) + 1

    def onehot(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels[:, 0], self.num_classes).permute(0, 4, 1, 2, 3).float()


def load_fewshot(folder: str | Path, intensity: dict, device="cpu") -> FewShotData:
    folder = Path(folder)
    manifest = load_manifest(folder)
    images, labels, hidden = {}, {}, {}
    for item in manifest["items"]:
        image = sitk.ReadImage(str(folder / item["image"]), sitk.sitkFloat32)
        images[item["name"]] = normalize(to_tensor(image, device), intensity)
        if item.get("labels"):
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / item["labels"])))
            tensor = torch.from_numpy(array.astype(np.int64))[None, None].to(device)
            (labels if item["labelled"] and item["split"] == "train" else hidden)[item["name"]] = tensor
    train = [e["name"] for e in manifest["items"] if e["split"] == "train"]
    val = [e["name"] for e in manifest["items"] if e["split"] == "val"]
    return FewShotData(manifest, images, labels, hidden, train, val)
