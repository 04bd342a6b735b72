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


# The generator's settings for the seed methods' pairs: its intensity changes (bias field, gamma, noise, blur,
# thick slices) as the synthetic strategy draws them, and a small spatial change (what is left after
# pre-alignment: the seed methods register on the working grid without an affine); real images only by
# default (`real_image_probability` < 1 mixes in images synthesised from the label maps).
SEED_AUGMENTATION = {"rotation_deg": 3.0, "scale": 0.03, "shear": 0.0, "shift_fraction": 0.02,
                     "velocity_std_mm": (0.0, 3.0), "crop_probability": 0.0, "real_image_probability": 1.0}


def augmentation_settings(config: dict, data: FewShotData):
    """The generator settings a seed-method config asks for (`"augmentation"`: false = none, a dict =
    overrides of SEED_AUGMENTATION), or None."""
    from ..data.generator import SynthesisSettings
    wanted = config.get("augmentation", {})
    if wanted is False or wanted is None:
        return None
    spacing = float(min(data.manifest["working_grid"]["spacing"]))
    return SynthesisSettings(**{**SEED_AUGMENTATION, "spacing_mm": spacing, **wanted})


class AugmentedData:
    """A FewShotData whose training images, and the labels of the labelled ones, are drawn anew every step
    through the same generator the synthetic strategy uses (data/generator.py): the same random
    deformation for an image and its labels, then the generator's intensity changes, normalised as the
    model normalises. Within a step an image is drawn once (every update of the step sees the same one);
    validation images and labels kept for evaluation are never changed. Everything else is the data set's."""

    def __init__(self, data: FewShotData, settings, intensity: dict):
        from ..data.atlas_sources import real_image_source
        from ..data.generator import BrainSynthesizer
        self.raw, self.intensity = data, intensity
        sources = []
        for name in data.train:
            labels = data.labels.get(name)
            sources.append(real_image_source(name, data.images[name][0, 0].float().cpu().numpy(),
                                             None if labels is None else labels[0, 0].cpu().numpy(), 0.02))
        self.synthesizer = BrainSynthesizer(sources, settings, device=data.images[data.train[0]].device)
        self.index = {name: i for i, name in enumerate(data.train)}
        self.rng = np.random.default_rng(0)
        self.drawn = {}
        self.images = _Drawn(self, data.images, "image")
        self.labels = _Drawn(self, data.labels, "target")

    def next_step(self, rng: np.random.Generator) -> None:
        self.rng, self.drawn = rng, {}

    def draw(self, name: str):
        if name not in self.drawn:
            labelled = name in self.raw.labels
            subject = self.synthesizer.sample(self.rng, self.index[name], use_real=None if labelled else True)
            self.drawn[name] = {"image": normalize(subject.image, self.intensity), "target": subject.target}
        return self.drawn[name]

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _Drawn(dict):
    """name -> tensor: a training image's draw of this step, the data set's own tensor otherwise."""

    def __init__(self, owner: AugmentedData, originals: dict, key: str):
        super().__init__(originals)
        self.owner, self.key = owner, key

    def __getitem__(self, name):
        if name in self.owner.index and dict.__contains__(self, name):
            return self.owner.draw(name)[self.key]
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        return self[name] if dict.__contains__(self, name) else default
