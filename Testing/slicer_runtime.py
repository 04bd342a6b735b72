"""Headless MRML for tests (slicer-core): a booted scene with the module logics Slicer would provide,
and stand-ins for the GUI-only modules (qt, ctk, ScriptedLoadableModule, parameterNodeWrapper, i18n)
so that the module file imports and its Logic runs on the real scene."""
from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import slicer
import vtk

MODULE_FILE = Path(__file__).resolve().parent.parent / "JointRegSeg" / "JointRegSeg.py"
UI_FILE = MODULE_FILE.parent / "Resources" / "UI" / "JointRegSeg.ui"


def boot():
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    logics = {"colors": colors}
    for name, cls in [("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Transforms", slicer.vtkSlicerTransformLogic)]:
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{k: types.SimpleNamespace(logic=lambda lg=v: lg)
                                              for k, v in logics.items()})
    return types.SimpleNamespace(scene=scene, app=app, **logics)


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)


def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__getattr__ = lambda n: _Anything()
    module.__dict__.update(attrs)
    return module


class _ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


def _parameter_node_wrapper(cls):
    def __init__(self, node=None):
        self.parameterNode = node
        for key in cls.__annotations__:
            setattr(self, key, getattr(cls, key, None))
    cls.__init__ = __init__
    return cls


def import_module_file(monkeypatch):
    """Import JointRegSeg/JointRegSeg.py with the Slicer-GUI-only modules stubbed."""
    class Base:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace()

    slm = _stub("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
                ScriptedLoadableModuleLogic=_ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest=unittest.TestCase)
    stubs = {"qt": _stub("qt"), "ctk": _stub("ctk"), "slicer.ScriptedLoadableModule": slm,
             "slicer.parameterNodeWrapper": _stub("slicer.parameterNodeWrapper",
                                                  parameterNodeWrapper=_parameter_node_wrapper),
             "slicer.i18n": _stub("slicer.i18n", tr=lambda s: s, translate=lambda c, s: s)}
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            monkeypatch.setattr(slicer, name.split(".")[1], module, raising=False)
    spec = importlib.util.spec_from_file_location("JointRegSeg", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
