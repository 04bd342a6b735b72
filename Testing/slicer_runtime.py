"""Headless MRML for tests (slicer-core): a booted scene with the module logics Slicer would provide,
and stand-ins for the GUI-only modules (qt, ctk, ScriptedLoadableModule, parameterNodeWrapper, i18n)
so that the module file imports and its Logic runs on the real scene."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time
import types
import typing
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
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


def _base_type(annotation):
    """`Annotated[int, WithinRange(...)]` -> int; plain types unchanged."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def _parameter_node_wrapper(cls):
    """Like Slicer's parameterNodeWrapper: values live in the MRML parameter node (node references for
    MRML nodes, serialized parameters otherwise), so they go away when the scene is cleared, as in Slicer."""
    annotations = dict(cls.__annotations__)
    defaults = {key: getattr(cls, key, None) for key in annotations}

    def make_property(key, base):
        if isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
            def get(self):
                return self.parameterNode.GetNodeReference(key)

            def set_(self, value):
                self.parameterNode.SetNodeReferenceID(key, value.GetID() if value is not None else None)
        else:
            def get(self):
                text = self.parameterNode.GetParameter(key)
                if not text:
                    return defaults[key] if base is not pathlib.Path else pathlib.Path(".")
                value = json.loads(text)
                return pathlib.Path(value) if base is pathlib.Path else value

            def set_(self, value):
                if value is not None and base is not pathlib.Path and not isinstance(value, base):
                    raise TypeError(f"{key}: expected {base.__name__}, got {type(value).__name__}")
                self.parameterNode.SetParameter(key, json.dumps(str(value) if isinstance(value, pathlib.PurePath)
                                                                else value))
        return property(get, set_)

    for key, annotation in annotations.items():
        setattr(cls, key, make_property(key, _base_type(annotation)))

    def __init__(self, node=None):
        self.parameterNode = node

    cls.__init__ = __init__
    for method in ("AddObserver", "RemoveObserver", "HasObserver", "Modified"):   # as Slicer's wrapper: the node's
        setattr(cls, method, lambda self, *args, _m=method: getattr(self.parameterNode, _m)(*args))
    cls.connectGui = lambda self, gui: object()          # the GUI binding is Qt's; nothing to bind here
    cls.disconnectGui = lambda self, tag: None
    return cls


class FakeWidget:
    """What the module does to a Qt widget, recorded: enough of QPushButton, QLabel, QComboBox, QProgressBar,
    QListWidget and ctkPathLineEdit for the Widget's slots to run on the real scene."""

    def __init__(self, name):
        self.name, self.enabled, self.visible, self.text, self.toolTip = name, True, True, "", ""
        self.value, self.format, self.items, self.currentIndex, self._blocked = 0, "", [], -1, False
        self.connections = {}

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self.connections.get(signal, []):
            slot(*args)

    def click(self):
        assert self.enabled, f"{self.name} is disabled"
        self.emit("clicked(bool)", False)

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setFormat(self, text):
        self.format = text

    def blockSignals(self, blocked):
        previous, self._blocked = self._blocked, blocked
        return previous

    # combo box / list widget
    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def insertItem(self, index, text, data=None):
        self.items.insert(index, (text, data))

    def count(self):
        return len(self.items)

    def itemText(self, index):
        return self.items[index][0] if 0 <= index < len(self.items) else ""

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def findData(self, data):
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def setCurrentIndex(self, index):
        self.currentIndex = index
        if not self._blocked:
            self.emit("currentIndexChanged(int)", index)

    def texts(self):
        return [item[0] for item in self.items]


class FakeTimer:
    """qt.QTimer stand-in: records start/stop; `fire()` runs the slot as one timeout would."""

    def __init__(self):
        self.active, self.interval, self.slots = False, 0, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        assert signal == "timeout()"
        self.slots.append(slot)

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active

    def fire(self):
        for slot in self.slots:
            slot()


class FakeUi:
    """childWidgetVariables(...) stand-in: any widget name gives a FakeWidget (the .ui test checks the names)."""

    def __getattr__(self, name):
        widget = FakeWidget(name)
        setattr(self, name, widget)
        return widget


WIDGETS = []


def release_widgets():
    """Detach the widgets made by make_widget from their scenes (as Slicer does on cleanup())."""
    while WIDGETS:
        WIDGETS.pop().removeObservers()


def make_widget(module, ctx):
    """The module's Widget set up on FakeUi over the real scene (as after setup() in Slicer); call
    release_widgets() when done."""
    widget = module.JointRegSegWidget(types.SimpleNamespace(isEntered=True))
    widget.parent = types.SimpleNamespace(isEntered=True)
    widget.timerClass = FakeTimer
    widget.errors, widget.answers = [], []
    widget.showError = widget.errors.append
    widget.confirm = lambda text: (widget.answers.append(text), widget.confirm_answer)[1]
    widget.confirm_answer = True
    widget.setupWith(FakeUi())
    WIDGETS.append(widget)
    return widget


class _SampleDataLogic:
    """SampleData's logic as the module uses it: custom sources registered by name, loaded from their local
    (file://) URIs into the scene as volumes named after the source's nodeNames."""
    sources: dict = {}
    loads: list = []

    @classmethod
    def registerCustomSampleDataSource(cls, category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, thumbnailFileName=None, **kwargs):
        cls.sources[sampleName] = dict(category=category, uris=list(uris), fileNames=list(fileNames),
                                                    nodeNames=list(nodeNames), thumbnailFileName=thumbnailFileName)

    def sourceForSampleName(self, sampleName):
        return self.sources.get(sampleName)

    def downloadSamples(self, sampleName):
        from urllib.parse import urlparse
        from urllib.request import url2pathname
        source = self.sources[sampleName]
        self.loads.append(sampleName)
        volumes = slicer.modules.volumes.logic()
        return [volumes.AddArchetypeVolume(url2pathname(urlparse(uri).path), name)
                for uri, name in zip(source["uris"], source["nodeNames"])]


def sample_data_module():
    """A fresh SampleData stand-in (no sources registered)."""
    logic = type("SampleDataLogic", (_SampleDataLogic,), {"sources": {}, "loads": []})
    return _stub("SampleData", SampleDataLogic=logic)


def import_module_file(monkeypatch):
    """Import JointRegSeg/JointRegSeg.py with the Slicer-GUI-only modules stubbed."""
    class Base:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace()

    class Test(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    slm = _stub("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
                ScriptedLoadableModuleLogic=_ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest=Test)
    stubs = {"qt": _stub("qt"), "ctk": _stub("ctk"), "slicer.ScriptedLoadableModule": slm,
             "slicer.parameterNodeWrapper": _stub("slicer.parameterNodeWrapper",
                                                  parameterNodeWrapper=_parameter_node_wrapper),
             "slicer.i18n": _stub("slicer.i18n", tr=lambda s: s, translate=lambda c, s: s),
             "SampleData": sample_data_module()}
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            monkeypatch.setattr(slicer, name.split(".")[1], module, raising=False)
    spec = importlib.util.spec_from_file_location("JointRegSeg", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- what the tests of the module share: the scene, the module file, worker clean-up, a pair, a click ----

@pytest.fixture
def ctx():
    return boot()


@pytest.fixture
def module(monkeypatch, ctx):
    yield import_module_file(monkeypatch)
    release_widgets()


@pytest.fixture(scope="module", autouse=True)
def stop_workers_after_module():
    """Imported into a test module, it stops the shared warm workers that module started when it ends."""
    yield
    from JointRegSegLib.slicer.worker import stop_shared_workers
    stop_shared_workers()


def add_volume(image, name: str, node_class="vtkMRMLScalarVolumeNode"):
    from JointRegSegLib.slicer.mrml import ijk_to_ras
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijk_to_ras(image), name,
                                          nodeClassName=node_class)


def add_pair(tag=""):
    """The phantom pair as scalar volume nodes: moving on an oblique LPS grid, fixed shifted 2, -3, 1.5 mm."""
    from conftest import grid_for, phantom_array, sample_on
    moving = sample_on(grid_for("lps-oblique"), phantom_array)
    fixed = sample_on(grid_for("axis-aligned"), phantom_array, lambda p: p + np.array([2.0, -3.0, 1.5]))
    return add_volume(moving, f"moving{tag}"), add_volume(fixed, f"fixed{tag}")


def drive(widget, timeout_s=900):
    """Click Register & Segment and let the poll timer run until the job is over."""
    widget.ui.applyButton.click()
    assert widget.job is not None, widget.errors
    deadline = time.time() + timeout_s
    while widget.job is not None:
        assert time.time() < deadline, "run did not finish"
        widget.onPoll()
        time.sleep(0.05)
    assert not widget.errors, widget.errors
