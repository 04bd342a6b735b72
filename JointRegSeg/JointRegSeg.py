"""JointRegSeg: deep joint registration + segmentation of two 3D volumes, as a Slicer module.

Thin by design: the Widget reads and writes the parameter node and calls the Logic; the Logic hands
MRML nodes to JointRegSegLib.slicer.mrml, which runs the engine in a warm worker process (imports and model
loaded once, kept between clicks) and builds result nodes.
"""
import contextlib
import importlib.metadata
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# In a source checkout the engine sits next to this module's folder; installed, beside this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "JointRegSegLib")) and _candidate not in sys.path:
        sys.path.append(_candidate)      # last: never shadows Slicer's own modules or site-packages

from JointRegSegLib.models.card import licence_text, read_card  # noqa: E402  (needs the path above)
from JointRegSegLib.core.errors import Cancelled, CheckpointError, InputImageError, JointRegSegError  # noqa: E402
from JointRegSegLib.models.installed import REPO_ROOT, default_model_path, installed_models  # noqa: E402

BROWSE_ITEM = "Browse…"
DOCUMENTATION_URL = "https://github.com/jointregseg/SlicerJointRegSeg#in-3d-slicer"
# Minutes the warm engine process may stay unused before it is ended (its memory and any GPU memory freed)
IDLE_MINUTES = 10
REQUIREMENTS_FILE = REPO_ROOT / "Resources" / "requirements.txt"
SAMPLE_FOLDER = REPO_ROOT / "Resources" / "SampleData"
# The extension's terminology context (every structure of the shipped models, with sides, and the brain mask)
TERMINOLOGY_FILE = pathlib.Path(_HERE) / "Resources" / "SegmentationCategoryTypeModifier-JointRegSeg.term.json"
SAMPLE_PAIR = {"moving": ("colin27_t1_brain_2mm.nii.gz", "JointRegSeg sample moving (Colin27 T1)"),
               "fixed": ("itk_subject_t1_brain.nii.gz", "JointRegSeg sample fixed (subject T1)")}
# Packages Slicer (or the PyTorch extension) provides: installing our requirements must never replace them.
KEEP_INSTALLED = ("torch", "torchvision", "numpy", "SimpleITK", "scipy", "vtk")
# MONAI 1.6 (Resources/requirements.txt) needs torch >= 2.8: asked of the PyTorch extension's installer.
MIN_TORCH_VERSION = "2.8"
TORCH_REQUIREMENT = f"torch>={MIN_TORCH_VERSION}"
RESEARCH_NOTICE = ("For research use only. Not a medical device: do not use the results for diagnosis or "
                   "treatment decisions. Check every result visually.")
# what the engine reports -> what the progress bar says
STAGE_WORDS = {
    "starting": _("Starting the engine…"), "starting the engine": _("Starting the engine…"),
    "validate inputs": _("Checking the volumes…"), "load model": _("Loading the model…"),
    "affine pre-alignment": _("Aligning the volumes (affine)…"),
    "resample to working grid": _("Preparing the volumes…"),
    "find the brains": _("Finding the brain in each volume…"), "network inference": _("Running the network…"),
    "match contrasts": _("Matching the two volumes' contrasts…"),
    "velocity scale": _("Choosing the deformation's strength…"),
    "test-time refinement": _("Refining the alignment…"),
    "compose transform": _("Building the transform…"), "warp moving": _("Warping the moving volume…"),
    "segmentations": _("Segmenting both volumes…"), "quality control": _("Checking the result…"),
    "save results": _("Saving the results…"),
}

CITATIONS = """
<p>Methods:</p><ul>
<li>Xu Z, Niethammer M. DeepAtlas: Joint Semi-supervised Learning of Image Registration and Segmentation. MICCAI 2019.</li>
<li>He Y et al. Deep Complementary Joint Model for Complex Scene Registration and Few-shot Segmentation on Medical
Images (DeepRS). ECCV 2020.</li>
<li>He Y et al. Few-shot Learning for Deformable Medical Image Registration with Perception-Correspondence
Decoupling and Reverse Teaching (PC-Reg-RT); Learning Better Registration to Learn Better Few-Shot Medical Image
Segmentation (BRBS).</li>
<li>Estienne T et al. U-ReSNet: Ultimate Coupling of Registration and Segmentation with Deep Nets. MICCAI 2019.</li>
</ul>"""


class JointRegSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Joint Registration & Segmentation")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["JointRegSeg developers"]
        self.parent.helpText = _(
            "Registers a moving volume onto a fixed volume with a trained deep network and segments both. "
            "Outputs: a transform (an affine and a displacement field: apply it to the moving volume, or harden "
            "it, to align it), the warped moving volume, segmentations of the fixed and the moving image and the "
            "moving segmentation warped onto the fixed one (segments carry standard SNOMED CT terminology), and "
            "quality measures (folding, Jacobian map, "
            "structure volumes). Work runs in a separate process kept warm between runs; Cancel stops it and "
            "leaves the scene as it was. <b>{notice}</b>").format(notice=RESEARCH_NOTICE) + CITATIONS + \
            "<p>" + _("Documentation: {link}").format(link=f'<a href="{DOCUMENTATION_URL}">{DOCUMENTATION_URL}</a>') \
            + "</p>"
        self.parent.acknowledgementText = acknowledgementText()
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", loadTerminology)


def modelSourcesText(card: dict) -> str:
    """What a model was trained on, from its card (data.sources, with each source's licence where given)."""
    sources = []
    for source in card.get("data", {}).get("sources", []):
        what = source.get("name") or source.get("source") or source.get("provenance") or ""
        detail = source.get("provenance") if source.get("provenance") and source.get("provenance") != what else ""
        licence = source.get("licence") or source.get("license")
        sources.append(what + (f" ({detail})" if detail else "") + (f" [licence: {licence}]" if licence else ""))
    return "; ".join(s for s in sources if s)


def licenceWords(card: dict) -> str:
    """The licence of a model's weights in words (the card's own), or that the card names none."""
    return licence_text(card) or _("not stated in the model card")


def acknowledgementText(model=None) -> str:
    """Slicer's acknowledgement for the module, written from the model card of `model` (default: the embedded
    default model): what it was trained on, what was held out, and the licence of its weights."""
    text = _("Built on 3D Slicer, MONAI, PyTorch and SimpleITK.")
    try:
        card = read_card(model or default_model_path())
    except JointRegSegError:
        return text
    text += " " + _("Model {name}: trained on {sources}.").format(
        name=card.get("name", "?"), sources=modelSourcesText(card) or "?")
    held = card.get("data", {}).get("held_out")
    if held:
        text += " " + _("Held out (never trained on): {held}.").format(
            held=held if isinstance(held, str) else ", ".join(map(str, held)))
    text += " " + _("Licence of the model weights: {licence}.").format(licence=licenceWords(card))
    return text


def loadTerminology() -> str:
    """Load the extension's terminology context (segments name it) into Slicer's Terminologies module;
    returns its name. Loading it again replaces it (no duplicate)."""
    return slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))


def sampleDataSources() -> dict:
    """The module's sample pair, as SampleData's registerCustomSampleDataSource arguments (local files: offline)."""
    names = [SAMPLE_PAIR[role][0] for role in ("moving", "fixed")]
    return {"category": "JointRegSeg", "sampleName": "JointRegSegBrainPair",
            "uris": [(SAMPLE_FOLDER / name).as_uri() for name in names], "fileNames": names,
            "nodeNames": [SAMPLE_PAIR[role][1] for role in ("moving", "fixed")],
            "thumbnailFileName": os.path.join(_HERE, "Resources", "Icons", "JointRegSeg.png")}


def registerSampleData() -> None:
    """Add the bundled brain pair to the Sample Data module (category JointRegSeg)."""
    import SampleData
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sampleDataSources())


@parameterNodeWrapper
class JointRegSegParameterNode:
    movingVolume: vtkMRMLScalarVolumeNode
    fixedVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    device: str = "auto"
    affine: bool = True
    refineIterations: Annotated[int, WithinRange(0, 1000)] = 0
    guideMovingSegmentation: vtkMRMLSegmentationNode
    guideFixedSegmentation: vtkMRMLSegmentationNode
    newNodesEachRun: bool = True
    outputTransform: vtkMRMLTransformNode
    outputWarpedVolume: vtkMRMLScalarVolumeNode
    outputFixedSegmentation: vtkMRMLSegmentationNode
    outputMovingSegmentation: vtkMRMLSegmentationNode
    outputWarpedMovingSegmentation: vtkMRMLSegmentationNode
    outputJacobian: bool = True
    outputJacobianVolume: vtkMRMLScalarVolumeNode
    trainingFolder: pathlib.Path
    annotatedVolume: vtkMRMLScalarVolumeNode
    annotatedSegmentation: vtkMRMLSegmentationNode
    finetuneSteps: Annotated[int, WithinRange(10, 5000)] = 300


OUTPUT_PARAMETERS = {"transform": "outputTransform", "warped": "outputWarpedVolume",
                     "fixed_segmentation": "outputFixedSegmentation",
                     "moving_segmentation": "outputMovingSegmentation",
                     "warped_moving_segmentation": "outputWarpedMovingSegmentation",
                     "jacobian": "outputJacobianVolume"}


class JointRegSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    # Seconds a cancelled run gets to stop by itself before its process tree is killed.
    cancelGraceSeconds = 10.0
    # The timer class (qt.QTimer in Slicer; tests give a stand-in).
    timerClass = None

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.results = None
        self.finetuneRun = None
        self.stopping = []               # cancelled runs (jobs, fine-tuning) not yet ended
        self.filledOutputs = {}          # output parameter -> ID of the node the last run made for it
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/JointRegSeg.ui"))
        self.layout.addWidget(uiWidget)
        ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.setupWith(ui)

    def setupWith(self, ui) -> None:
        """Everything after loading the .ui: connections, observers, parameter node, model and device lists."""
        self.ui = ui
        self.logic = JointRegSegLogic()
        self.pollTimer = self.newTimer(200, self.onPoll)
        self.finetuneTimer = self.newTimer(500, self.onFinetunePoll)
        self.stopTimer = self.newTimer(200, self.onStopPoll)
        self.deviceTimer = self.newTimer(500, self.onDevicePoll)          # until the engine says if CUDA is there
        self.idleTimer = self.newTimer(60 * 1000, self.onIdlePoll)        # ends an engine unused for IDLE_MINUTES
        ui.applyButton.connect("clicked(bool)", self.onApply)
        ui.cancelButton.connect("clicked(bool)", self.onCancel)
        ui.swapButton.connect("clicked(bool)", self.onSwap)
        ui.showJacobianButton.connect("clicked(bool)", self.onShowJacobian)
        ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChosen)
        ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        ui.finetuneCancelButton.connect("clicked(bool)", self.onFinetuneCancel)
        ui.trainingFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateCaseList)
        ui.releaseEngineButton.connect("clicked(bool)", self.onReleaseEngine)
        ui.researchNoticeLabel.text = RESEARCH_NOTICE
        ui.progressBar.hide()
        ui.finetuneProgressBar.hide()
        ui.cancelButton.enabled = False
        ui.finetuneCancelButton.enabled = False
        ui.showJacobianButton.enabled = False
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def newTimer(self, intervalMs: int, slot):
        timer = (self.timerClass or qt.QTimer)()
        timer.setInterval(intervalMs)
        timer.connect("timeout()", slot)
        return timer

    def cleanup(self) -> None:
        """Never waits: cancels are sent, and what has not ended is followed (and killed after the grace period)
        by background threads, as no timer of this widget will run any more."""
        from JointRegSegLib.slicer.worker import reap_in_background
        for timer in self.timers():
            timer.stop()
        self.cancelJob()
        self.cancelFinetune()
        stopping, self.stopping = self.stopping, []
        for item in stopping:
            reap_in_background(item)
        self.logic.stopWorker(wait=False, timeout_s=self.cancelGraceSeconds)
        self.removeObservers()

    def timers(self) -> tuple:
        return (self.pollTimer, self.finetuneTimer, self.stopTimer, self.deviceTimer, self.idleTimer)

    def enter(self) -> None:
        self.initializeParameterNode()
        self.logic.warmUp()              # start the engine in the background while the user picks volumes
        if not self.logic.devicesKnown():
            self.deviceTimer.start()     # the device list gains "cuda" once the engine has reported
        self.idleTimer.start()

    def onDevicePoll(self) -> None:
        """Refill the device list once the engine has said whether CUDA is there (or has stopped)."""
        if self.logic.devicesKnown() or not self.logic.worker().alive:
            self.deviceTimer.stop()
            self.populateDevices()

    def onIdlePoll(self) -> None:
        """End the engine process after IDLE_MINUTES without use (it starts again on the next run)."""
        if self.job is None and not self.stopping:
            self.logic.stopIdleWorker(IDLE_MINUTES * 60)

    def onReleaseEngine(self, *args) -> None:
        """Free the engine's memory now (its process ends; CPU and GPU memory go back to Slicer and to other
        extensions). Not while a run goes on."""
        if self.job is not None:
            self.showError(_("Wait for the registration to finish (or cancel it) before freeing the engine."))
            return
        self.logic.stopWorker(wait=False, timeout_s=self.cancelGraceSeconds)
        self.ui.releaseEngineButton.toolTip = _("Engine stopped; it starts again on the next run.")

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    # --- messages (one place, so that every slot reports errors the same way) ----------------------
    def showError(self, text: str) -> None:
        slicer.util.errorDisplay(text, windowTitle=_("JointRegSeg"))

    def confirm(self, text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("JointRegSeg"))

    @contextlib.contextmanager
    def reportErrors(self, what: str):
        """slicer.util.tryWithErrorDisplay(what, waitCursor=True) for the slots, except that the exception is not
        raised again (a GUI slot must not raise) and the message goes through showError (one place)."""
        cursor = self.logic.waitCursor() if self.logic is not None else contextlib.nullcontext()
        try:
            with cursor:
                yield
        except Exception as err:        # noqa: BLE001 (a GUI slot must not raise)
            logging.exception(what)
            self.showError(f"{what}\n\n{err}")

    # --- scene and parameter node ------------------------------------------------------------------
    def onSceneStartClose(self, caller, event) -> None:
        self.cancelJob()                 # its inputs are going away: stop it, nothing will be loaded
        self.clearResults()
        self.setParameterNode(None)

    def clearResults(self) -> None:
        """The results panel as before any run (its nodes are gone with the scene)."""
        self.results = None
        self.filledOutputs = {}
        if self.ui.resultsLabel.text != _("Cancelled; the scene is unchanged."):
            self.ui.resultsLabel.text = ""
        self.ui.showJacobianButton.enabled = False

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.setDefaultParameters(self._parameterNode)
        self.populateModels()
        self.populateDevices()

    def setParameterNode(self, parameterNode: Optional[JointRegSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # widgets with the "SlicerParameterName" property in the .ui follow the parameter node
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    # --- model and device choice --------------------------------------------------------------------
    def populateModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name, path in self.logic.models().items():
            combo.addItem(name, str(path))
        chosen = self._parameterNode.modelPath if self._parameterNode else ""
        if chosen and combo.findData(chosen) < 0:
            combo.addItem(os.path.basename(chosen), chosen)
        combo.addItem(BROWSE_ITEM, "")
        index = combo.findData(chosen) if chosen else -1
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)
        self.onModelChosen(combo.currentIndex)

    def onModelChosen(self, index: int) -> None:
        combo = self.ui.modelComboBox
        path = combo.itemData(index)
        if combo.itemText(index) == BROWSE_ITEM:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a JointRegSeg model"), "",
                                                  "JointRegSeg model (*.safetensors)")
            if not path:
                self.populateModels()
                return
            combo.insertItem(index, os.path.basename(path), path)
            combo.setCurrentIndex(index)
            return
        if self._parameterNode and (path or "") != self._parameterNode.modelPath:
            self._parameterNode.modelPath = path or ""
        self.ui.modelInfoLabel.text = self.logic.describeModel(path) if path else ""
        self.ui.expectedInputLabel.text = self.logic.describeExpectedInput(path) if path else ""
        self.updateButtons()

    def populateDevices(self) -> None:
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        devices = self.logic.availableDevices()
        for device in devices:
            combo.addItem(device, device)
        chosen = self._parameterNode.device if self._parameterNode else "auto"
        combo.setCurrentIndex(max(combo.findData(chosen if chosen in devices else "auto"), 0))
        combo.blockSignals(wasBlocked)
        self.onDeviceChosen(combo.currentIndex)

    def onDeviceChosen(self, index: int) -> None:
        device = self.ui.deviceComboBox.itemData(index) or "auto"
        if self._parameterNode and self._parameterNode.device != device:
            self._parameterNode.device = device

    def onSwap(self, *args) -> None:
        node = self._parameterNode
        if node:
            node.movingVolume, node.fixedVolume = node.fixedVolume, node.movingVolume

    # --- run ----------------------------------------------------------------------------------
    def updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        reason = None
        if self.job is not None:
            reason = _("A registration is running")
        elif self.stopping:
            reason = _("Stopping the cancelled run…")
        elif self.finetuneRun is not None:
            reason = _("Wait for the fine-tuning to finish (or cancel it)")
        elif not (node and node.movingVolume and node.fixedVolume):
            reason = _("Select a moving and a fixed volume")
        elif node.movingVolume.GetID() == node.fixedVolume.GetID():
            reason = _("Moving and fixed are the same volume; select two different volumes")
        elif not node.modelPath:
            reason = _("Select a model")
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Register the moving volume to the fixed one and segment both")
        busy = self.job is not None or self.finetuneRun is not None
        self.ui.finetuneButton.enabled = not busy
        self.ui.addCaseButton.enabled = self.finetuneRun is None

    def onApply(self, *args) -> None:
        node = self._parameterNode
        with self.reportErrors(_("Could not start Register & Segment.")):
            self.logic.installDependencies(askConfirmation=True, confirm=self.confirm)
            if node.newNodesEachRun:
                # keep the previous run's results: new nodes where a selector still shows what the last run made;
                # a node the user chose or created in a selector is filled
                for parameter, nodeId in self.filledOutputs.items():
                    chosen = getattr(node, parameter)
                    if chosen is not None and chosen.GetID() == nodeId:
                        setattr(node, parameter, None)
            guide = (node.guideMovingSegmentation, node.guideFixedSegmentation) \
                if node.guideMovingSegmentation or node.guideFixedSegmentation else None
            self.job = self.logic.start(node.movingVolume, node.fixedVolume, node.modelPath, affine=node.affine,
                                        refineIterations=node.refineIterations, device=node.device, guide=guide,
                                        outputs=self.chosenOutputs())
            self.ui.resultsLabel.text = ""
            self.ui.progressBar.value = 0
            self.ui.progressBar.setFormat(self.logic.describeStage("starting") + " %p%")
            self.ui.progressBar.show()
            self.ui.cancelButton.enabled = True
            self.updateButtons()
            self.pollTimer.start()

    def chosenOutputs(self) -> dict:
        node = self._parameterNode
        return {role: getattr(node, parameter) for role, parameter in OUTPUT_PARAMETERS.items()
                if getattr(node, parameter) is not None}

    def onPoll(self) -> None:
        job = self.job
        if job is None:
            self.pollTimer.stop()
            return
        try:
            stage, fraction = job.run.progress
            self.ui.progressBar.value = int(round(100 * fraction))
            self.ui.progressBar.setFormat(self.logic.describeStage(stage) + " %p%")
            if job.run.state == "running":
                return
            self.pollTimer.stop()
            self.job = None
            self.finishJob(job)
        except Exception as err:                 # noqa: BLE001 (a timer slot must not raise)
            self.pollTimer.stop()
            if self.job is not None:
                self.job.cancel()
                self.job = None
            logging.exception("JointRegSeg progress")
            self.showError(_("Register & Segment failed.") + f"\n\n{err}")
            self.resetRunControls()

    def finishJob(self, job) -> None:
        node = self._parameterNode
        try:
            with self.reportErrors(_("Register & Segment failed.")):
                try:
                    results = self.logic.finish(job, outputs=self.chosenOutputs(), jacobian=node.outputJacobian)
                except Cancelled:
                    self.ui.resultsLabel.text = _("Cancelled; the scene is unchanged.")
                    return
                self.results = results
                self.filledOutputs = {}
                for role, parameter in OUTPUT_PARAMETERS.items():
                    if getattr(results, role) is not None:
                        setattr(node, parameter, getattr(results, role))
                        self.filledOutputs[parameter] = getattr(results, role).GetID()
                self.ui.resultsLabel.text = self.logic.describeQc(results.qc)
                self.ui.showJacobianButton.enabled = results.jacobian is not None
                self.logic.showResults(results, node.fixedVolume)
        finally:
            self.resetRunControls()

    def resetRunControls(self) -> None:
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        self.updateButtons()

    def cancelJob(self) -> None:
        """Send the cancel and return at once (never waits for the engine): the stop timer follows the run to
        its end and kills its process tree if it has not stopped within cancelGraceSeconds."""
        job, self.job = self.job, None
        if job is not None:
            self.pollTimer.stop()
            self.stopLater(job)
            self.ui.resultsLabel.text = _("Cancelled; the scene is unchanged.")
            self.resetRunControls()

    def stopLater(self, stoppable) -> None:
        """`stoppable` (a job or a fine-tuning run): request_cancel now, reap from the stop timer."""
        try:
            stoppable.request_cancel(self.cancelGraceSeconds)
        except Exception:                        # noqa: BLE001 (its process may be gone already)
            logging.exception("JointRegSeg cancel")
        self.stopping.append(stoppable)
        self.stopTimer.start()

    def onStopPoll(self) -> None:
        still = []
        for item in self.stopping:
            try:
                if not item.reap():
                    still.append(item)
            except Exception:                    # noqa: BLE001 (a timer slot must not raise)
                logging.exception("JointRegSeg cancel")
        self.stopping = still
        if not still:
            self.stopTimer.stop()
            self.updateButtons()

    def onCancel(self, *args) -> None:
        if self.job is not None:
            self.cancelJob()

    def onShowJacobian(self, *args) -> None:
        with self.reportErrors(_("Could not show the Jacobian map.")):
            if self.results is None or self.results.jacobian is None \
                    or slicer.mrmlScene.GetNodeByID(self.results.jacobian.GetID()) is None:
                self.ui.showJacobianButton.enabled = False
                raise JointRegSegError(_("there is no Jacobian map in this scene: run Register & Segment (with "
                                         "'Jacobian map' checked) first"))
            self.logic.showJacobian(self.results.jacobian, self._parameterNode.fixedVolume)

    # --- annotate & refine ------------------------------------------------------------------------
    def trainingFolder(self):
        """The chosen training folder, or None (an unset path parameter reads as ".")."""
        folder = self._parameterNode.trainingFolder if self._parameterNode else None
        return folder if folder and str(folder).strip(". ") else None

    def updateCaseList(self, *args) -> None:
        with self.reportErrors(_("Could not read the training folder.")):
            self.ui.casesListWidget.clear()
            folder = self.trainingFolder()
            for name in self.logic.trainingCases(folder) if folder else []:
                self.ui.casesListWidget.addItem(name)

    def onAddCase(self, *args) -> None:
        node = self._parameterNode
        with self.reportErrors(_("Could not add the case.")):
            folder = self.trainingFolder()
            if folder is None:
                raise JointRegSegError(_("choose a training folder first"))
            overwrite = False
            if node.annotatedVolume is not None and self.logic.caseExists(folder, node.annotatedVolume):
                if not self.confirm(_("The training folder already has a case named '{name}'. Replace it?").format(
                        name=self.logic.caseName(node.annotatedVolume))):
                    return
                overwrite = True
            self.logic.addTrainingCase(folder, node.annotatedVolume, node.annotatedSegmentation, node.modelPath,
                                       overwrite=overwrite)
        self.updateCaseList()

    def onFinetune(self, *args) -> None:
        node = self._parameterNode
        with self.reportErrors(_("Could not start fine-tuning.")):
            if self.job is not None:
                raise JointRegSegError(_("wait for the running registration to finish"))
            if self.trainingFolder() is None or not self.logic.trainingCases(self.trainingFolder()):
                raise JointRegSegError(_("add corrected cases to a training folder first"))
            self.logic.installDependencies(askConfirmation=True, confirm=self.confirm)
            output = self.logic.newModelPath(node.modelPath)
            self.finetuneRun = (self.logic.startFinetune(node.modelPath, self.trainingFolder(), output,
                                                         steps=node.finetuneSteps, device=node.device), output)
            self.ui.finetuneCancelButton.enabled = True
            self.ui.finetuneProgressBar.value = 0
            self.ui.finetuneProgressBar.show()
            self.ui.finetuneResultLabel.text = ""
            self.updateButtons()
            self.finetuneTimer.start()

    def onFinetuneCancel(self, *args) -> None:
        if self.finetuneRun is not None:
            self.ui.finetuneProgressBar.setFormat(_("Cancelling…"))
            self.cancelFinetune()

    def cancelFinetune(self) -> None:
        """Send the cancel and return at once; the fine-tuning timer sees the process end (and the stop timer
        kills it after the grace period)."""
        if self.finetuneRun is not None and self.finetuneRun[0] not in self.stopping:
            self.stopLater(self.finetuneRun[0])

    def onFinetunePoll(self) -> None:
        if self.finetuneRun is None:
            self.finetuneTimer.stop()
            return
        run, output = self.finetuneRun
        try:
            stage, fraction = run.progress
            self.ui.finetuneProgressBar.value = int(round(100 * fraction))
            self.ui.finetuneProgressBar.setFormat(_("Fine-tuning: {stage}").format(stage=stage) + " %p%")
            if run.state == "running":
                return
            self.finetuneTimer.stop()
            self.finetuneRun = None
            if run.state != "done":
                self.ui.finetuneResultLabel.text = _("Fine-tuning cancelled.") if run.state == "cancelled" else \
                    _("Fine-tuning failed: {error}").format(error=run.error)
                return
            text, improved = self.logic.describeFinetune(output)
            self.ui.finetuneResultLabel.text = text
            self.populateModels()              # the new model is in the user models folder: listed from now on
            if not improved and self.logic.finetuneComparable(output):
                improved = self.confirm(_("The fine-tuned model was not shown to be better on corrected cases it "
                                          "was not trained on.\n\n{text}\n\nUse it anyway?").format(
                    text=text.replace("<br>", "\n")))
            if improved:
                self._parameterNode.modelPath = str(output)
                self.populateModels()
        except Exception as err:               # noqa: BLE001
            self.finetuneTimer.stop()
            self.finetuneRun = None
            logging.exception("JointRegSeg fine-tuning")
            self.showError(_("Fine-tuning failed.") + f"\n\n{err}")
        finally:
            if self.finetuneRun is None:
                self.ui.finetuneProgressBar.hide()
                self.ui.finetuneCancelButton.enabled = False
                self.updateButtons()


class JointRegSegLogic(ScriptedLoadableModuleLogic):
    """Register & Segment on scene nodes. `process` blocks (scripts, batch); `start`/`finish` let the
    Widget keep Slicer responsive while the engine works in the warm worker process."""

    def __init__(self, python=None, warm=True) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.python, self.warm = python, warm

    def getParameterNode(self):
        return JointRegSegParameterNode(super().getParameterNode())

    def setDefaultParameters(self, node) -> None:
        """Fill what a fresh (or just cleared) parameter node lacks: the model, a device."""
        if not node.modelPath or not os.path.isfile(node.modelPath):
            try:
                node.modelPath = str(default_model_path())
            except CheckpointError:
                models = self.models()
                node.modelPath = str(next(iter(models.values()))) if models else ""
        if not node.device:
            node.device = "auto"

    # --- dependencies ----------------------------------------------------------------------------
    @staticmethod
    def requirements() -> list:
        """Requirement strings from Resources/requirements.txt (PyTorch is not among them)."""
        lines = REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
        return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()
                and not line.strip().startswith("-")]

    @staticmethod
    def _satisfied(requirement: str) -> bool:
        """Installed at a version the requirement accepts (not merely importable: an old MONAI fails)."""
        try:
            from packaging.requirements import Requirement
        except ImportError:                  # a Slicer without `packaging`: "name", "name==v" and "name>=v" only
            name, op, wanted = next(((requirement.partition(o)[0], o, requirement.partition(o)[2])
                                     for o in ("==", ">=") if o in requirement), (requirement, "", ""))
            try:
                installed = importlib.metadata.version(name.strip())
            except importlib.metadata.PackageNotFoundError:
                return False
            key = lambda v: [int(p) if p.isdigit() else 0 for p in v.split("+")[0].split(".")]  # noqa: E731
            return not op or (installed == wanted.strip() if op == "==" else key(installed) >= key(wanted.strip()))
        parsed = Requirement(requirement)
        try:
            installed = importlib.metadata.version(parsed.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return parsed.specifier.contains(installed, prereleases=True)

    @classmethod
    def missingDependencies(cls) -> list:
        """Requirements not installed at a version that satisfies them (torch: MIN_TORCH_VERSION or newer)."""
        missing = [] if cls._satisfied(TORCH_REQUIREMENT) else [TORCH_REQUIREMENT]
        return missing + [r for r in cls.requirements() if not cls._satisfied(r)]

    @staticmethod
    def installedTorchVersion() -> Optional[str]:
        try:
            return importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None

    @staticmethod
    def torchTooOldMessage(version: str) -> str:
        return _("JointRegSeg needs PyTorch {minimum} or newer; this Slicer has PyTorch {version}. Open the "
                 "'PyTorch Utils' module, uninstall PyTorch, install it again with the version requirement "
                 "'>={minimum}', restart Slicer and try again.").format(minimum=MIN_TORCH_VERSION, version=version)

    @staticmethod
    def installFailedMessage(names) -> str:
        return _("Could not install {names}, which JointRegSeg needs. Check the internet connection (and proxy "
                 "settings) and try again; the details are in the Python console.").format(names=", ".join(names))

    def installTorch(self, askConfirmation: bool) -> None:
        """PyTorch >= MIN_TORCH_VERSION through the PyTorch extension; an older one is never replaced here
        (other extensions may use it): the message says how."""
        installed = self.installedTorchVersion()
        if installed is not None:
            raise JointRegSegError(self.torchTooOldMessage(installed))
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise JointRegSegError(_("JointRegSeg needs PyTorch. Install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer, and try again.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        try:
            try:
                torch = torchLogic.installTorch(askConfirmation, torchVersionRequirement=f">={MIN_TORCH_VERSION}")
            except TypeError:                  # a PyTorch extension without version requirements
                torch = torchLogic.installTorch(askConfirmation)
        except (subprocess.CalledProcessError, OSError) as err:
            logging.error("JointRegSeg: installing PyTorch failed: %s\n%s", err, getattr(err, "output", "") or "")
            raise JointRegSegError(self.installFailedMessage(["PyTorch"])) from None
        if torch is None:
            raise JointRegSegError(_("PyTorch is not installed; JointRegSeg cannot run without it."))
        importlib.invalidate_caches()
        installed = self.installedTorchVersion()
        if installed is not None and not self._satisfied(TORCH_REQUIREMENT):
            raise JointRegSegError(self.torchTooOldMessage(installed))

    @staticmethod
    def constraints() -> str:
        """pip constraints pinning what Slicer and the PyTorch extension installed, so that installing the
        requirements can never replace Slicer's torch (or numpy, SimpleITK, ...)."""
        pins = []
        for name in KEEP_INSTALLED:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                continue
        return "\n".join(pins) + "\n"

    def installDependencies(self, askConfirmation: bool = True, confirm=None) -> None:
        """PyTorch through the PyTorch extension, the rest with slicer.packaging.pip_ensure from
        Resources/requirements.txt under constraints that keep Slicer's packages (skipped when Slicer runs
        its tests: then a missing package is an error, never a download)."""
        missing = self.missingDependencies()
        if TORCH_REQUIREMENT in missing:
            self.installTorch(askConfirmation)
            missing.remove(TORCH_REQUIREMENT)
        if not missing:
            return
        with tempfile.TemporaryDirectory(prefix="JointRegSeg-pip-") as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as handle:
                handle.write(self.constraints())
            ensure = self._pipEnsure()
            try:
                if ensure is not None:
                    ensure(missing, constraints=constraints, prompt_install=askConfirmation, requester="JointRegSeg",
                           skip_in_testing=True)
                else:                  # Slicer before slicer.packaging: the same, by hand
                    confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(text))
                    if askConfirmation and not confirm(
                            _("JointRegSeg needs these Python packages: {names}. Install them now? This can take a "
                              "few minutes.").format(names=", ".join(missing))):
                        raise RuntimeError("declined")
                    with self.waitCursor():
                        slicer.util.pip_install(["-c", constraints, *missing])
            except (subprocess.CalledProcessError, OSError) as err:   # offline, a proxy, a package index down
                logging.error("JointRegSeg: installing %s failed: %s\n%s", ", ".join(missing), err,
                              getattr(err, "output", "") or "")
                raise JointRegSegError(self.installFailedMessage(missing)) from None
            except RuntimeError as err:
                raise JointRegSegError(_("missing Python packages: {names} ({reason})").format(
                    names=", ".join(missing), reason=err)) from None
        importlib.invalidate_caches()
        still = [r for r in missing if not self._satisfied(r)]
        if still:
            raise JointRegSegError(_("missing Python packages: {names}; JointRegSeg cannot run without them").format(
                names=", ".join(still)))

    @staticmethod
    @contextlib.contextmanager
    def waitCursor():
        """slicer.util.WaitCursor where this Slicer has it and an application to show it (nothing otherwise)."""
        factory = getattr(slicer.util, "WaitCursor", None)
        cursor = None
        if factory is not None:
            try:
                cursor = factory()
                cursor.__enter__()
            except Exception:                # noqa: BLE001 (no application: headless Python)
                cursor = None
        try:
            yield
        finally:
            if cursor is not None:
                cursor.__exit__(None, None, None)

    @staticmethod
    def _pipEnsure():
        for name in ("packaging", "pydeps"):
            module = getattr(slicer, name, None)
            if module is None:
                try:
                    module = importlib.import_module(f"slicer.{name}")
                except ImportError:
                    continue
            if hasattr(module, "pip_ensure"):
                return module.pip_ensure
        return None

    # --- models and devices ---------------------------------------------------------------------
    @staticmethod
    def userModelsFolder() -> pathlib.Path:
        """Where fine-tuned models go; the model list reads it."""
        return pathlib.Path(os.environ.get("JOINTREGSEG_USER_MODELS", pathlib.Path.home() / "JointRegSegModels"))

    def models(self) -> dict:
        """Model name -> path: embedded and $JOINTREGSEG_MODELS models, then the user's fine-tuned ones."""
        found = dict(installed_models())
        folder = self.userModelsFolder()
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            if path.name.endswith(".partial.safetensors"):
                continue
            try:
                name = read_card(path).get("name", path.stem)
            except CheckpointError:
                continue
            found[name if name not in found else f"{name} ({path.stem})"] = path
        return found

    def availableDevices(self) -> list:
        """auto and cpu, plus cuda only where a CUDA device is there (asked of the warm worker, which has
        torch loaded, else of torch if Slicer already imported it; never imports torch here)."""
        worker = self.worker()
        if "cuda" in worker.info:
            cuda = worker.info["cuda"]
        elif "torch" in sys.modules:
            cuda = bool(sys.modules["torch"].cuda.is_available())
        else:
            cuda = False
        return ["auto", "cpu"] + (["cuda"] if cuda else [])

    # --- the warm worker -------------------------------------------------------------------------
    def worker(self):
        from JointRegSegLib.slicer.worker import shared_worker
        return shared_worker(self.python)

    def warmUp(self) -> None:
        """Start the engine process now (when the dependencies are there), so the first click does not wait."""
        if self.warm and not self.missingDependencies():
            self.worker().start()

    def devicesKnown(self) -> bool:
        """Whether the engine has reported if CUDA is there (until then "cuda" may still come: the list is
        filled again once it has)."""
        return "cuda" in self.worker().info

    def stopIdleWorker(self, idle_s: float) -> bool:
        """End the warm worker if nothing has used it for `idle_s` seconds; True if it was ended."""
        return self.worker().stop_if_idle(idle_s)

    def stopWorker(self, wait: bool = True, timeout_s: float = 5.0) -> None:
        """End the warm worker; `wait=False` returns at once (a background thread kills it after `timeout_s`)."""
        self.worker().stop(timeout_s=timeout_s, wait=wait)

    # --- work --------------------------------------------------------------------------------
    def start(self, moving, fixed, model=None, affine=True, refineIterations=0, device="auto", python=None,
              guide=None, outputs=None):
        """Start the work in the warm worker; `guide` = (moving, fixed) corrected segmentation nodes that the
        refinement also aligns. Returns a JointRegSegLib.slicer.mrml.Job (run.progress, run.state, cancel)."""
        from JointRegSegLib.slicer.mrml import Job
        python = python or self.python
        worker = self.worker() if self.warm and python == self.python else None
        return Job(moving, fixed, model or None, affine=affine, refine_iterations=refineIterations,
                   device=device, python=python, guide=guide, worker=worker, outputs=outputs)

    def finish(self, job, outputs=None, jacobian=True):
        return job.finish(slicer.mrmlScene, outputs, jacobian)

    def process(self, moving, fixed, model=None, affine=True, refineIterations=0, device="auto", outputs=None,
                jacobian=True, progress=None, cancel=None, python=None, guide=None):
        """Blocking Register & Segment. Returns JointRegSegLib.slicer.mrml.Results (transform, warped,
        fixed_segmentation, moving_segmentation, warped_moving_segmentation, jacobian nodes and the qc dict).
        Raises JointRegSegError with a message naming the problem; the scene is then unchanged."""
        missing = self.missingDependencies()
        if missing:
            raise JointRegSegError(f"missing Python packages: {', '.join(missing)}; call "
                                   "JointRegSegLogic().installDependencies() first")
        job = self.start(moving, fixed, model, affine, refineIterations, device, python, guide, outputs)
        try:
            job.run.wait(progress, cancel)
        except BaseException:
            job.cancel()
            raise
        return self.finish(job, outputs, jacobian)

    # --- showing results ------------------------------------------------------------------------
    @staticmethod
    def showResults(results, fixed) -> None:
        """Warped moving volume over the fixed one, the fixed segmentation as outlines (2D fill off)."""
        from JointRegSegLib.slicer.mrml import show_over
        show_over(fixed, results.warped, 0.5)
        display = results.fixed_segmentation.GetDisplayNode() if results.fixed_segmentation is not None else None
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility2DOutline(True)
            display.SetVisibility2DFill(False)
        for role in ("moving_segmentation", "warped_moving_segmentation", "fixed_brain_mask", "moving_brain_mask"):
            node = getattr(results, role)
            if node is not None and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(False)   # one segmentation on screen at a time

    @staticmethod
    def showJacobian(jacobian, fixed, opacity: float = 0.5) -> int:
        """The Jacobian determinant map (det J colour map: folding black, compression blue, expansion red) over
        the fixed volume in every slice view; returns how many views show it."""
        from JointRegSegLib.slicer.mrml import show_over, style_jacobian
        style_jacobian(jacobian)
        return show_over(fixed, jacobian, opacity)

    # --- annotate & refine ------------------------------------------------------------------------
    @staticmethod
    def trainingCases(folder) -> list:
        """Case names in a training folder; file names only, no torch in Slicer's process."""
        from JointRegSegLib.slicer.mrml import list_training_cases
        return list_training_cases(folder)

    @staticmethod
    def caseName(volume) -> str:
        from JointRegSegLib.slicer.mrml import case_name
        return case_name(volume)

    @staticmethod
    def caseExists(folder, volume) -> bool:
        from JointRegSegLib.slicer.mrml import case_name, existing_case_files
        return bool(existing_case_files(folder, case_name(volume)))

    def addTrainingCase(self, folder, volume, segmentation, model=None, overwrite=False):
        """Save a corrected case (image, label map by the model's structures, .seg.nrrd) into `folder`."""
        from JointRegSegLib.slicer.mrml import save_training_case
        card = read_card(model or default_model_path())
        return save_training_case(folder, volume, segmentation, card["labels"], overwrite=overwrite)

    def newModelPath(self, model) -> str:
        """A new file in the user models folder (which the model list reads), never the original."""
        base = pathlib.Path(model or default_model_path())
        folder = self.userModelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        index = 1
        while (folder / f"{base.stem}-ft{index}.safetensors").exists():
            index += 1
        return str(folder / f"{base.stem}-ft{index}.safetensors")

    def startFinetune(self, model, folder, output, steps=300, device="auto", python=None):
        from JointRegSegLib.slicer.worker import BackgroundRun
        args = ["finetune", "--init", model or default_model_path(), "--labelled", folder, "--out", output,
                "--steps", int(steps), "--device", device]
        return BackgroundRun(args, python=python or self.python)

    def finetune(self, model, folder, output, steps=300, device="auto", progress=None, cancel=None, python=None):
        """Blocking fine-tuning; returns (text, improved)."""
        run = self.startFinetune(model, folder, output, steps, device, python)
        run.wait(progress, cancel)
        return self.describeFinetune(output)

    @staticmethod
    def describeFinetune(path) -> tuple:
        card = read_card(path)
        info = card.get("finetune", {})
        before, after = info.get("metrics_before", {}), info.get("metrics_after", {})
        dice_before = before.get("segmentation_dice_mean", float("nan"))
        dice_after = after.get("segmentation_dice_mean", float("nan"))
        # evidence enough to switch: better (not equal) on corrected cases the fine-tuning did not train on
        held_out = bool(info.get("held_out"))
        improved = held_out and dice_after > dice_before
        if improved:
            verdict = f"Better on held-out cases. New model: {path}"
        elif held_out:
            verdict = f"Not better on held-out cases; the panel keeps the previous model (saved as {path})."
        else:
            verdict = ("Measured on the cases it was trained on (none held out): this does not show that it is "
                       f"better on new images. Add more corrected cases to hold some out. Saved as {path}.")
        text = (f"Segmentation Dice on {info.get('measured_on', '?')}: {dice_before:.3f} → {dice_after:.3f}<br>"
                + verdict)
        return text, improved

    @staticmethod
    def finetuneComparable(path) -> bool:
        """Not worse where it was measured: worth asking whether to use it (a held-out loss is not asked)."""
        info = read_card(path).get("finetune", {})
        before = info.get("metrics_before", {}).get("segmentation_dice_mean", float("nan"))
        after = info.get("metrics_after", {}).get("segmentation_dice_mean", float("nan"))
        return not info.get("held_out") and after >= before

    # --- text for the panel --------------------------------------------------------------------
    @staticmethod
    def describeStage(stage: str) -> str:
        if stage in STAGE_WORDS:
            return STAGE_WORDS[stage]
        return stage[:1].upper() + stage[1:] + "…" if stage else _("Working…")

    @staticmethod
    def describeExpectedInput(path) -> str:
        """The input the model expects, in the card's own words (shown next to the volume selectors)."""
        try:
            card = read_card(path)
        except JointRegSegError:
            return ""
        return _("This model expects: {modality}").format(modality=card.get("modality") or "?")

    @staticmethod
    def describeModel(path) -> str:
        try:
            card = read_card(path)
        except JointRegSegError as err:
            return f"<b>Cannot use this file:</b> {err}"
        labels = ", ".join(e["name"] for e in card["labels"] if int(e["value"]) != 0)
        training = card.get("training", {})
        data = card.get("data", {})
        sources = "; ".join(s.get("source", s.get("provenance", s.get("name", ""))) for s in data.get("sources", []))
        grid = card["working_grid"]
        metrics = card.get("metrics", {})
        figures = []
        for key, label in (("registration_dice_mean", "registration Dice"),
                           ("registration_dice_affine_only", "affine only"),
                           ("dice_before_registration", "Dice before registration"),
                           ("segmentation_dice_mean", "segmentation Dice"),
                           ("folding_percent_mean", "folding %")):
            if isinstance(metrics.get(key), (int, float)):
                figures.append(f"{label} {metrics[key]:.3f}")
        if not figures:   # a card with its own headline figures (flat numbers), e.g. the raw-scan benchmark's
            figures = [f"{key} {value:.3f}" for key, value in metrics.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)][:12]
        pairs = metrics.get("validation_pairs", metrics.get("heldout_synthetic_pairs"))
        validation = ("<br>Validation" + (f" ({pairs} pairs)" if pairs else "") + ": " + ", ".join(figures)
                      + (f"<br><i>{metrics['note']}</i>" if metrics.get("note") else "")) if figures else \
            "<br>Validation: <i>this model card reports no validation figures</i>"
        return (f"<b>{card.get('name', '')}</b>: {card.get('description', '')}<br>"
                f"Modality: {card.get('modality', '?')}; working grid {grid['size']} at {grid['spacing']} mm<br>"
                f"Labels: {labels}<br>"
                f"Training: {training.get('strategy', '?')}, "
                + (f"{len(training['labelled_images'])} labelled images; " if "labelled_images" in training else "")
                + f"data: {sources or '?'}" + (f"; held out: {data['held_out']}" if data.get("held_out") else "")
                + f"<br><b>Licence of the model weights:</b> {licenceWords(card)}"
                + validation)

    @staticmethod
    def volumeFlags(qc: dict, label_table=None) -> dict:
        """Structure -> plausibility warning (or "") for the fixed volumes: a structure not found, a volume
        outside the model's expected range (label entry "volume_ml": [low, high]) or, lacking that, more than
        2x away from the same structure in the moving image."""
        fixed, moving = qc.get("fixed_volumes_ml", {}), qc.get("moving_volumes_ml", {})
        ranges = {e["name"]: e["volume_ml"] for e in (label_table or qc.get("label_table") or [])
                  if isinstance(e.get("volume_ml"), (list, tuple)) and len(e["volume_ml"]) == 2}
        engine = [str(f) for f in qc.get("volume_flags") or []]
        flags = {}
        for name, value in fixed.items():
            flag = ""
            said = [f for f in engine if f.startswith(f"{name}:")]
            if said:
                flag = said[0][len(name) + 1:].strip()
            elif value <= 0:
                flag = "not found"
            elif name in ranges and not ranges[name][0] <= value <= ranges[name][1]:
                flag = f"outside the expected {ranges[name][0]:g}–{ranges[name][1]:g} ml"
            elif moving.get(name, 0) > 0 and not 0.5 <= value / moving[name] <= 2.0:
                flag = f"{value / moving[name]:.1f}× the moving image's ({moving[name]:.1f} ml)"
            flags[name] = flag
        return flags

    @staticmethod
    def describeStatus(qc: dict) -> str:
        """The run's self-check (registration_status "ok" / "check", the agreement of the fixed image's own
        segmentation with the carried moving one) and the engine's warnings, as panel text ("" if none)."""
        import html
        status = qc.get("registration_status")
        agreement = qc.get("agreement_mean")
        measured = f" (segmentation agreement {agreement:.2f})" if isinstance(agreement, (int, float)) else ""
        text = ""
        if status == "ok":
            text = f"<b>Registration: ok</b>{measured}<br>"
        elif status:
            text = (f"<b>&#9888; Registration: {html.escape(str(status))}</b>{measured} — check the alignment "
                    "before using the results<br>")
        mapped = (qc.get("contrast") or {}).get("mapped")
        if mapped:
            text += (f"Contrasts differ: the registration saw the {html.escape(str(mapped))} (the outputs are of "
                     "the original volumes)<br>")
        warnings = [w for w in qc.get("warnings") or [] if w]
        if warnings:
            text += "Warnings:<ul>" + "".join(f"<li>&#9888; {html.escape(str(w))}</li>" for w in warnings) + "</ul>"
        return text

    @staticmethod
    def volumeWord(flag: str, status) -> str:
        """The check column of one structure: its warning, else "plausible", or, when the run's self-check
        says the registration needs checking, "unverified" (a volume ratio cannot vouch for the result)."""
        import html
        if flag:
            return "&#9888; " + html.escape(flag)
        if status == "check":
            return "unverified: the registration needs checking"
        return "plausible"

    @classmethod
    def describeQc(cls, qc: dict) -> str:
        import html
        volumes = qc.get("fixed_volumes_ml", {})
        moving = qc.get("moving_volumes_ml", {})
        flags = cls.volumeFlags(qc)
        status = qc.get("registration_status")
        rows = "".join(
            f"<tr><td>{name}</td><td align='right'>{value:.1f}</td>"
            f"<td align='right'>{moving.get(name, float('nan')):.1f}</td>"
            f"<td>{cls.volumeWord(flags.get(name, ''), status)}</td></tr>"
            for name, value in volumes.items())
        named = {f"{name}:" for name in volumes}
        other = [f for f in qc.get("volume_flags") or [] if not any(str(f).startswith(n) for n in named)]
        rows_note = ("Volume checks:<ul>" + "".join(f"<li>&#9888; {html.escape(str(f))}</li>" for f in other)
                     + "</ul>") if other else ""
        timing = qc.get("timing_s", {})
        folding = qc["folding_percent"]
        verdict = "ok" if folding < 0.1 else "&#9888; high: check the alignment"
        return (cls.describeStatus(qc) +
                f"Folding: {folding:.4f} % of voxels (det J &le; 0) — {verdict}<br>"
                f"Jacobian determinant: {qc['jacobian_min']:.3f} to {qc['jacobian_max']:.3f}<br>"
                f"Time: {timing.get('total', float('nan')):.1f} s on {qc.get('device', '?')}<br>"
                f"<table><tr><th>structure</th><th>fixed ml</th><th>moving ml</th><th>check</th></tr>{rows}</table>"
                + rows_note +
                f"<p><i>{RESEARCH_NOTICE}</i></p>")


class JointRegSegTest(ScriptedLoadableModuleTest):
    """Slicer's self-test on the bundled sample pair. Offline: the volumes are the module's own files and
    nothing is installed (pip_ensure is skipped while testing). Where PyTorch or MONAI are absent (the
    Extensions build machines: the PyTorch extension is there, torch is not), it tests loading the data and
    the Logic's contract without inference, as TotalSegmentator and MONAIAuto3DSeg do."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_sample_pair_and_the_logic_contract()
        self.setUp()
        self.test_register_and_segment_sample_pair()

    def loadSamplePair(self):
        """The pair as a user gets it: through the Sample Data module (category JointRegSeg), local files."""
        import SampleData
        name = sampleDataSources()["sampleName"]
        logic = SampleData.SampleDataLogic()
        if not logic.sourceForSampleName(name):          # registered at start-up; a test may run before that
            registerSampleData()
        moving, fixed = logic.downloadSamples(name)
        self.assertEqual((moving.GetName(), fixed.GetName()), (SAMPLE_PAIR["moving"][1], SAMPLE_PAIR["fixed"][1]))
        return moving, fixed

    def test_sample_pair_and_the_logic_contract(self):
        """No torch needed: the data loads, the default model is listed and described, bad inputs and missing
        packages are refused with a message, and a refusal leaves the scene unchanged."""
        moving, fixed = self.loadSamplePair()
        for volume in (moving, fixed):
            dims = volume.GetImageData().GetDimensions()
            self.assertGreaterEqual(min(dims), 8)
            self.assertGreater(float(volume.GetImageData().GetScalarRange()[1]), 0.0)
        logic = JointRegSegLogic()
        model = default_model_path()
        self.assertIn(model, list(logic.models().values()))
        self.assertIn(read_card(model)["name"], logic.describeModel(model))
        node = logic.getParameterNode()
        logic.setDefaultParameters(node)
        self.assertEqual(node.modelPath, str(model))
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputImageError):
            logic.start(moving, moving, str(model))
        with self.assertRaises(InputImageError):
            logic.start(None, fixed, str(model))
        missing = logic.missingDependencies()
        if missing:
            with self.assertRaises(JointRegSegError) as raised:
                logic.process(moving, fixed, device="cpu")
            self.assertIn("missing Python packages", str(raised.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        text = logic.describeQc({"folding_percent": 0.0, "jacobian_min": 0.8, "jacobian_max": 1.2,
                                 "fixed_volumes_ml": {"left caudate": 3.5}, "moving_volumes_ml": {"left caudate": 3.4},
                                 "registration_status": "ok"})
        self.assertIn("left caudate", text)
        self.delayDisplay("JointRegSeg data and Logic checks passed")

    def test_register_and_segment_sample_pair(self):
        logic = JointRegSegLogic()
        missing = logic.missingDependencies()
        if missing:
            self.delayDisplay(f"Inference not tested: {', '.join(missing)} not installed (the self-test never "
                              "downloads)")
            return
        moving, fixed = self.loadSamplePair()
        results = logic.process(moving, fixed, device="cpu")
        self.assertLess(results.qc["folding_percent"], 0.1)
        labels = [e for e in results.qc["label_table"] if e["value"] != 0]
        for role in ("fixed_segmentation", "moving_segmentation", "warped_moving_segmentation"):
            segmentation = getattr(results, role).GetSegmentation()
            self.assertEqual(segmentation.GetNumberOfSegments(), len(labels))
            segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(labels[0]["name"]))
            self.assertIn("SCT^", segment.GetTerminology())
        found = [name for name, ml in results.qc["fixed_volumes_ml"].items() if ml > 0]
        # every structure of the label table found in the fixed head (the smallest, CSF and accumbens, ~1 ml)
        self.assertEqual(len(found), len(labels), f"structures found: {found}")
        self.delayDisplay("JointRegSeg self-test passed")
