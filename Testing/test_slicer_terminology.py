"""The extension's own terminology file (issue 24, item 5): every structure of every shipped label table,
and the brain mask, resolves in JointRegSeg/Resources/SegmentationCategoryTypeModifier-JointRegSeg.term.json
as Slicer's terminology logic loads it (slicer-core); the module loads it at start-up and segments name its
context. `python Testing/test_slicer_terminology.py` rewrites the file from the label tables."""
import json
import sys
import types
from pathlib import Path

import pytest

import slicer  # noqa: E402  (slicer-core; a missing one fails collection)

ROOT = Path(__file__).resolve().parent.parent
TERM_FILE = ROOT / "JointRegSeg" / "Resources" / "SegmentationCategoryTypeModifier-JointRegSeg.term.json"
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT)]

from JointRegSegLib.data.label_table import LABEL_TABLE, WHOLE_BRAIN_TABLE  # noqa: E402

CONTEXT = "Segmentation category and type - JointRegSeg"
ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
TISSUE = ["SCT", "85756007", "Tissue"]
BRAIN = ["SCT", "12738006", "Brain"]
SIDES = {"Left": ["SCT", "7771000", "Left"], "Right": ["SCT", "24028007", "Right"]}


def _code(triple, **extra):
    return {"CodingSchemeDesignator": triple[0], "CodeValue": triple[1], "CodeMeaning": triple[2], **extra}


def _rgb(colour):
    return [int(round(255 * float(c))) for c in colour]


def terminology_document() -> dict:
    """Slicer's SegmentationCategoryTypeModifier JSON for the label tables (types in table order; a sided
    structure gets Left/Right modifiers with its colour on each side), the brain mask, and generic Tissue."""
    types_, index = [], {}
    for entry in list(WHOLE_BRAIN_TABLE[1:]) + list(LABEL_TABLE[1:]):
        codes = entry["terminology"]
        kind = tuple(codes["type"])
        side = codes.get("modifier")
        name = entry["name"].split(" ", 1)[1] if side else entry["name"]
        if kind not in index:
            index[kind] = _code(codes["type"], **{"3dSlicerLabel": name.lower(), "paired": "Y" if side else "U"})
            if not side:
                index[kind]["recommendedDisplayRGBValue"] = _rgb(entry["color"])
            types_.append(index[kind])
        if side:
            modifiers = index[kind].setdefault("Modifier", [])
            if side[1] not in {m["CodeValue"] for m in modifiers}:
                modifiers.append(_code(side, **{"3dSlicerLabel": entry["name"].lower(),
                                                "recommendedDisplayRGBValue": _rgb(entry["color"])}))
    types_.append(_code(BRAIN, **{"3dSlicerLabel": "brain", "paired": "U",
                                  "recommendedDisplayRGBValue": [250, 250, 225]}))
    return {
        "SegmentationCategoryTypeContextName": CONTEXT,
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
        "SegmentationCodes": {"Category": [
            _code(ANATOMICAL_STRUCTURE, showAnatomy=False, Type=types_),
            _code(TISSUE, showAnatomy=False, Type=[_code(TISSUE, **{"3dSlicerLabel": "tissue",
                                                                    "recommendedDisplayRGBValue": [128, 174, 128]})]),
        ]},
    }


def loaded_codes(logic, context) -> set:
    """(category code, type code, modifier code or "") for every entry of a loaded terminology context."""
    found = set()
    for c in range(logic.GetNumberOfCategoriesInTerminology(context)):
        category = slicer.vtkSlicerTerminologyCategory()
        assert logic.GetNthCategoryInTerminology(context, c, category)
        for t in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
            kind = slicer.vtkSlicerTerminologyType()
            assert logic.GetNthTypeInTerminologyCategory(context, category, t, kind)
            found.add((category.GetCodeValue(), kind.GetCodeValue(), ""))
            for m in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, kind)):
                modifier = slicer.vtkSlicerTerminologyType()
                assert logic.GetNthTypeModifierInTerminologyType(context, category, kind, m, modifier)
                found.add((category.GetCodeValue(), kind.GetCodeValue(), modifier.GetCodeValue()))
    return found


def test_the_shipped_file_is_the_one_the_label_tables_give():
    assert json.loads(TERM_FILE.read_text(encoding="utf-8")) == terminology_document(), \
        "run: python Testing/test_slicer_terminology.py"


def test_every_structure_resolves_in_the_extensions_terminology():
    from JointRegSegLib.slicer.mrml import BRAIN_MASK_ENTRY, TERMINOLOGY_CONTEXT, label_terminology, terminology_entry
    from JointRegSegLib.models.installed import EMBEDDED_MODELS, installed_models
    from JointRegSegLib import read_card
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(TERM_FILE)) == CONTEXT == TERMINOLOGY_CONTEXT
    codes = loaded_codes(logic, CONTEXT)
    tables = {"LABEL_TABLE": LABEL_TABLE, "WHOLE_BRAIN_TABLE": WHOLE_BRAIN_TABLE, "brain mask": [BRAIN_MASK_ENTRY]}
    for path in set(installed_models().values()) | set(EMBEDDED_MODELS.glob("*.safetensors")):
        tables[Path(path).name] = read_card(path)["labels"]
    assert len(tables["WHOLE_BRAIN_TABLE"]) - 1 == 14 + 10 + 4
    for table_name, table in tables.items():
        for entry in table:
            if int(entry.get("value", 1)) == 0:
                continue
            wanted = label_terminology(entry)
            key = (wanted["category"][1], wanted["type"][1], wanted["modifier"][1] if wanted["modifier"] else "")
            assert key in codes, f"{table_name}: '{entry['name']}' {key} is not in the terminology file"
            assert wanted["type"] != tuple(TISSUE), f"{table_name}: '{entry['name']}' has no specific code"
            # the segment's serialized entry names this context and deserializes to the same codes
            text = terminology_entry(entry)
            parsed = slicer.vtkSlicerTerminologyEntry()
            assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, parsed)
            assert parsed.GetTerminologyContextName() == CONTEXT
            assert parsed.GetTypeObject().GetCodeValue() == wanted["type"][1]
            # Slicer finds it by the structure's name, the way the segment editor looks names up
            found = slicer.vtkSlicerTerminologyEntry()
            assert logic.FindTypeInTerminologyBy3dSlicerLabel(CONTEXT, entry["name"].lower(), found), entry["name"]
            assert found.GetTypeObject().GetCodeValue() == wanted["type"][1]
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(CONTEXT, "left cerebellum", slicer.vtkSlicerTerminologyEntry())


def test_the_module_loads_it_at_start_up(monkeypatch):
    from slicer_runtime import boot, import_module_file
    ctx = boot()   # noqa: F841  (keeps the scene and logics alive)
    module = import_module_file(monkeypatch)
    hooks = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: hooks.append((signal, slot))),
                        raising=False)
    module.JointRegSeg(type("Parent", (), {})())
    assert ("startupCompleted()", module.loadTerminology) in hooks
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    monkeypatch.setattr(slicer.modules, "terminologies", types.SimpleNamespace(logic=lambda: logic), raising=False)
    assert module.TERMINOLOGY_FILE == TERM_FILE
    assert module.loadTerminology() == CONTEXT
    assert logic.GetNumberOfCategoriesInTerminology(CONTEXT) == 2
    assert module.loadTerminology() == CONTEXT            # twice: no error, loaded once
    cmake = (ROOT / "JointRegSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f"Resources/{TERM_FILE.name}" in cmake           # installed with the module


if __name__ == "__main__":
    TERM_FILE.write_text(json.dumps(terminology_document(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {TERM_FILE}")
