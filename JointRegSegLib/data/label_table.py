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

# The whole-brain set (FreeSurfer aseg structures the offline DK/Destrieux and Neuromorphometrics maps carry).
# Values 1-14 are the 7-structure table's, unchanged, so guide labels and figures on those carry over.
WHOLE_BRAIN_SIDED = [
    ("cerebral white matter", ["SCT", "68523003", "Cerebral white matter"], (0.96, 0.93, 0.80)),
    ("cerebral cortex", ["SCT", "40146001", "Cerebral cortex"], (0.80, 0.24, 0.31)),
    ("lateral ventricle", ["SCT", "66720007", "Lateral ventricle"], (0.47, 0.07, 0.53)),
    ("accumbens", ["SCT", "279215006", "Nucleus accumbens"], (1.0, 0.65, 0.0)),
    ("ventral diencephalon", ["SCT", "62137007", "Diencephalon"], (0.65, 0.16, 0.16)),
]
WHOLE_BRAIN_MIDLINE = [
    ("third ventricle", ["SCT", "49688004", "Third ventricle"], (0.8, 0.71, 0.55)),
    ("fourth ventricle", ["SCT", "35918002", "Fourth ventricle"], (0.16, 0.8, 0.96)),
    ("brainstem", ["SCT", "15926001", "Brainstem"], (0.47, 0.72, 0.52)),
    ("cerebrospinal fluid", ["SCT", "65216001", "Cerebrospinal fluid"], (0.24, 0.24, 0.24)),
]
# Left and right of a structure get clearly different colours (left: the hue; right: a rotated hue of the
# same lightness), so a reader of the QC picture never tells sides apart by shade alone.


def _right_colour(colour) -> list:
    import colorsys
    h, l, s = colorsys.rgb_to_hls(*colour)
    return [round(c, 3) for c in colorsys.hls_to_rgb((h + 0.12) % 1.0, l, s)]


def _whole_brain_entries() -> list[dict]:
    table = [dict(e, color=list(e["color"])) for e in _entries()]
    for entry in table[1:]:
        if entry["name"].startswith("right "):
            name = entry["name"].split(" ", 1)[1]
            colour = next(c for n, _, c in STRUCTURES if n == name)
            entry["color"] = _right_colour(colour)
    value = len(table)
    for name, sct_type, colour in WHOLE_BRAIN_SIDED:
        for side in ("left", "right"):
            table.append({"value": value, "name": f"{side} {name}",
                          "color": list(colour) if side == "left" else _right_colour(colour),
                          "terminology": {"category": ANATOMICAL_STRUCTURE, "type": sct_type,
                                          "modifier": SIDES[side]}})
            value += 1
    for name, sct_type, colour in WHOLE_BRAIN_MIDLINE:
        table.append({"value": value, "name": name, "color": list(colour),
                      "terminology": {"category": ANATOMICAL_STRUCTURE, "type": sct_type}})
        value += 1
    return table


WHOLE_BRAIN_TABLE = _whole_brain_entries()
WHOLE_BRAIN_VALUES = {e["name"]: e["value"] for e in WHOLE_BRAIN_TABLE[1:]}
