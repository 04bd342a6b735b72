"""The default brain model's label table: 7 structures, left and right apart, with SNOMED CT codes
(category / type / modifier, as DICOM SEG and Slicer's terminologies carry them).

Cerebral cortex is left out on purpose: the offline sources define it inconsistently (AAL parcels
reach deep into white matter: 1.2 l on Colin27, FreeSurfer's ribbon is 0.5 l, Neuromorphometrics
0.8 l), so no model could be judged on it. It still drives synthesis through each source's own labels.
"""
from __future__ import annotations

ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
SIDES = {"left": ["SCT", "7771000", "Left"], "right": ["SCT", "24028007", "Right"]}
# name, SNOMED CT type, colour (FreeSurfer-like so left/right share a hue)
STRUCTURES = [
    ("caudate", ["SCT", "11000004", "Caudate nucleus"], (0.48, 0.73, 0.86)),
    ("putamen", ["SCT", "89278009", "Putamen"], (0.93, 0.05, 0.69)),
    ("pallidum", ["SCT", "14738005", "Globus pallidus"], (0.05, 0.19, 1.0)),
    ("thalamus", ["SCT", "119406000", "Thalamus"], (0.0, 0.46, 0.0)),
    ("hippocampus", ["SCT", "5366008", "Hippocampus"], (0.86, 0.85, 0.08)),
    ("amygdala", ["SCT", "4958002", "Amygdala"], (0.4, 1.0, 1.0)),
    ("cerebellum", ["SCT", "113305005", "Cerebellum"], (0.9, 0.58, 0.13)),
]


def _entries() -> list[dict]:
    table = [{"value": 0, "name": "background", "color": [0.0, 0.0, 0.0]}]
    for index, (name, sct_type, colour) in enumerate(STRUCTURES):
        for offset, side in enumerate(("left", "right")):
            shade = 1.0 if side == "left" else 0.75
            table.append({"value": 1 + 2 * index + offset, "name": f"{side} {name}",
                          "color": [round(c * shade, 3) for c in colour],
                          "terminology": {"category": ANATOMICAL_STRUCTURE, "type": sct_type,
                                          "modifier": SIDES[side]}})
    return table


LABEL_TABLE = _entries()
STRUCTURE_VALUES = {(e["name"].split(" ", 1)[0], e["name"].split(" ", 1)[1]): e["value"] for e in LABEL_TABLE[1:]}
