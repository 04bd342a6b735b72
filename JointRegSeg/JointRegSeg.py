"""JointRegSeg: deep joint registration + segmentation of two 3D volumes, as a Slicer module.

Thin by design: the Widget reads and writes the parameter node and calls the Logic; the Logic hands
MRML nodes to JointRegSegLib.mrml, which runs the engine in a child process and builds result nodes.
"""
import importlib.util
import os
import pathlib
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# In a source checkout the engine sits next to this module's folder; installed, beside this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "JointRegSegLib")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)

from JointRegSegLib.card import read_card  # noqa: E402  (needs the path above)
from JointRegSegLib.errors import Cancelled, JointRegSegError  # noqa: E402
from JointRegSegLib.models import default_model_path, installed_models  # noqa: E402

# pip name -> import name of what the engine needs besides Slicer's own Python packages
PIP_REQUIREMENTS = {"monai>=1.3": "monai", "safetensors>=0.4": "safetensors", "tqdm": "tqdm"}
BROWSE_ITEM = "Browse…"

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
            "Outputs: a grid transform (apply it to the moving volume to align it), the warped moving volume, "
            "segmentations of the fixed and the moving image, and quality measures (folding, Jacobian range, "
            "structure volumes). Work runs in a separate process; Cancel stops it and leaves the scene as it was."
        ) + CITATIONS
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, MONAI, PyTorch and SimpleITK. The embedded brain model was trained on the "
            "Colin27 and MNI ICBM 2009c templates with AAL labels; see the model card for sources and licences.")


@parameterNodeWrapper
class JointRegSegParameterNode:
    movingVolume: vtkMRMLScalarVolumeNode
    fixedVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    affine: bool = True
    refineIterations: Annotated[int, WithinRange(0, 1000)] = 0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    guideMovingSegmentation: vtkMRMLSegmentationNode
    guideFixedSegmentation: vtkMRMLSegmentationNode
    outputTransform: vtkMRMLTransformNode
    outputWarpedVolume: vtkMRMLScalarVolumeNode
    outputFixedSegmentation: vtkMRMLSegmentationNode
    outputMovingSegmentation: vtkMRMLSegmentationNode
    outputJacobian: bool = False
    trainingFolder: pathlib.Path
    annotatedVolume: vtkMRMLScalarVolumeNode
    annotatedSegmentation: vtkMRMLSegmentationNode
    finetuneSteps: Annotated[int, WithinRange(10, 5000)] = 300


class JointRegSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/JointRegSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = JointRegSegLogic()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(200)
        self.pollTimer.connect("timeout()", self.onPoll)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.trainingFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateCaseList)
        self.finetuneRun = None
        self.finetuneTimer = qt.QTimer()
        self.finetuneTimer.setInterval(500)
        self.finetuneTimer.connect("timeout()", self.onFinetunePoll)
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.populateModels()

    def cleanup(self) -> None:
        if self.job is not None:
            self.job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not n.IsA("vtkMRMLLabelMapVolumeNode")]
            if len(volumes) >= 2:
                self._parameterNode.movingVolume, self._parameterNode.fixedVolume = volumes[-1], volumes[0]

    def setParameterNode(self, parameterNode: Optional[JointRegSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # widgets with the "SlicerParameterName" property in the .ui follow the parameter node
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
            self.updateApplyButton()

    # --- model choice -------------------------------------------------------------------------
    def populateModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name, path in installed_models().items():
            combo.addItem(name, str(path))
        chosen = self._parameterNode.modelPath if self._parameterNode else ""
        if chosen and combo.findData(chosen) < 0:
            combo.addItem(os.path.basename(chosen), chosen)
        combo.addItem(BROWSE_ITEM, "")
        index = combo.findData(chosen) if chosen else combo.findData(str(default_model_path()))
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
        if self._parameterNode:
            self._parameterNode.modelPath = path or ""
        self.ui.modelInfoLabel.text = self.logic.describeModel(path) if path else ""
        self.updateApplyButton()

    # --- run ----------------------------------------------------------------------------------
    def updateApplyButton(self, caller=None, event=None) -> None:
        node = self._parameterNode
        ready = bool(node and node.movingVolume and node.fixedVolume and node.modelPath) and self.job is None
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Register the moving volume to the fixed one and segment both") if ready \
            else _("Select a moving volume, a fixed volume and a model")

    def onApply(self) -> None:
        node = self._parameterNode
        try:
            self.logic.installDependencies(askConfirmation=True)
            guide = (node.guideMovingSegmentation, node.guideFixedSegmentation) \
                if node.guideMovingSegmentation or node.guideFixedSegmentation else None
            self.job = self.logic.start(node.movingVolume, node.fixedVolume, node.modelPath, affine=node.affine,
                                        refineIterations=node.refineIterations, device=node.device, guide=guide)
        except JointRegSegError as err:
            slicer.util.errorDisplay(str(err), windowTitle=_("JointRegSeg"))
            return
        self.ui.resultsLabel.text = ""
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.cancelButton.enabled = True
        self.updateApplyButton()
        self.pollTimer.start()

    def onPoll(self) -> None:
        stage, fraction = self.job.run.progress
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{stage} %p%")
        if self.job.run.state == "running":
            return
        self.pollTimer.stop()
        node, job = self._parameterNode, self.job
        self.job = None
        outputs = {"transform": node.outputTransform, "warped": node.outputWarpedVolume,
                   "fixed_segmentation": node.outputFixedSegmentation,
                   "moving_segmentation": node.outputMovingSegmentation}
        try:
            with slicer.util.tryWithErrorDisplay(_("Register & Segment failed."), waitCursor=True):
                try:
                    results = self.logic.finish(job, outputs={k: v for k, v in outputs.items() if v},
                                                jacobian=node.outputJacobian)
                except Cancelled:
                    self.ui.resultsLabel.text = _("Cancelled; the scene is unchanged.")
                    return
                node.outputTransform, node.outputWarpedVolume = results.transform, results.warped
                node.outputFixedSegmentation = results.fixed_segmentation
                node.outputMovingSegmentation = results.moving_segmentation
                self.ui.resultsLabel.text = self.logic.describeQc(results.qc)
                slicer.util.setSliceViewerLayers(background=node.fixedVolume, foreground=results.warped,
                                                 foregroundOpacity=0.5, fit=True)
        finally:
            self.ui.progressBar.hide()
            self.ui.cancelButton.enabled = False
            self.updateApplyButton()

    def onCancel(self) -> None:
        if self.job is not None:
            self.ui.progressBar.setFormat(_("cancelling…"))
            self.job.run.cancel()
        if self.finetuneRun is not None:
            self.ui.progressBar.setFormat(_("cancelling…"))
            self.finetuneRun[0].cancel()

    # --- annotate & refine ------------------------------------------------------------------------
    def trainingFolder(self):
        """The chosen training folder, or None (an unset path parameter reads as ".")."""
        folder = self._parameterNode.trainingFolder if self._parameterNode else None
        return folder if folder and str(folder).strip(". ") else None

    def updateCaseList(self, *args) -> None:
        self.ui.casesListWidget.clear()
        folder = self.trainingFolder()
        for name in self.logic.trainingCases(folder) if folder else []:
            self.ui.casesListWidget.addItem(name)

    def onAddCase(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not add the case."), waitCursor=True):
            if self.trainingFolder() is None:
                raise JointRegSegError(_("choose a training folder first"))
            self.logic.addTrainingCase(self.trainingFolder(), node.annotatedVolume, node.annotatedSegmentation,
                                       node.modelPath)
        self.updateCaseList()

    def onFinetune(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start fine-tuning."), waitCursor=True):
            if self.trainingFolder() is None or not self.logic.trainingCases(self.trainingFolder()):
                raise JointRegSegError(_("add corrected cases to a training folder first"))
            self.logic.installDependencies(askConfirmation=True)
            output = self.logic.newModelPath(node.modelPath)
            self.finetuneRun = (self.logic.startFinetune(node.modelPath, self.trainingFolder(), output,
                                                         steps=node.finetuneSteps), output)
            self.ui.finetuneButton.enabled = False
            self.ui.cancelButton.enabled = True
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.finetuneTimer.start()

    def onFinetunePoll(self) -> None:
        run, output = self.finetuneRun
        stage, fraction = run.progress
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"fine-tuning: {stage} %p%")
        if run.state == "running":
            return
        self.finetuneTimer.stop()
        self.finetuneRun = None
        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        self.ui.finetuneButton.enabled = True
        if run.state != "done":
            self.ui.finetuneResultLabel.text = _("Fine-tuning cancelled.") if run.state == "cancelled" else \
                _("Fine-tuning failed: {error}").format(error=run.error)
            return
        text, improved = self.logic.describeFinetune(output)
        self.ui.finetuneResultLabel.text = text
        if improved:
            combo = self.ui.modelComboBox
            combo.insertItem(0, os.path.basename(output), str(output))
            combo.setCurrentIndex(0)


class JointRegSegLogic(ScriptedLoadableModuleLogic):
    """Register & Segment on scene nodes. `process` blocks (scripts, batch); `start`/`finish` let the
    Widget keep Slicer responsive while the engine works in a child process."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return JointRegSegParameterNode(super().getParameterNode())

    # --- dependencies ----------------------------------------------------------------------------
    @staticmethod
    def missingDependencies() -> list:
        needed = {"torch": "torch", **PIP_REQUIREMENTS}
        return [pip for pip, module in needed.items() if importlib.util.find_spec(module) is None]

    def installDependencies(self, askConfirmation: bool = True) -> None:
        """PyTorch through the PyTorch extension, the rest with pip, each after the user agrees."""
        missing = self.missingDependencies()
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise JointRegSegError(_("JointRegSeg needs PyTorch. Install the 'PyTorch' extension from the "
                                         "Extensions Manager, restart Slicer, and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation) is None:
                raise JointRegSegError(_("PyTorch is not installed; JointRegSeg cannot run without it."))
            missing.remove("torch")
        if not missing:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("JointRegSeg needs these Python packages: {names}. Install them now? This can take a few "
                  "minutes.").format(names=", ".join(missing))):
            raise JointRegSegError(_("missing Python packages: {names}").format(names=", ".join(missing)))
        slicer.util.pip_install(" ".join(missing))

    # --- work --------------------------------------------------------------------------------
    def start(self, moving, fixed, model=None, affine=True, refineIterations=0, device="auto", python=None,
              guide=None):
        """Start the work in a child process; `guide` = (moving, fixed) corrected segmentation nodes that the
        refinement also aligns. Returns a JointRegSegLib.mrml.Job (progress, state, cancel)."""
        from JointRegSegLib.mrml import Job
        return Job(moving, fixed, model or None, affine=affine, refine_iterations=refineIterations,
                   device=device, python=python, guide=guide)

    def finish(self, job, outputs=None, jacobian=False):
        return job.finish(slicer.mrmlScene, outputs, jacobian)

    def process(self, moving, fixed, model=None, affine=True, refineIterations=0, device="auto", outputs=None,
                jacobian=False, progress=None, cancel=None, python=None, guide=None):
        """Blocking Register & Segment. Returns JointRegSegLib.mrml.Results (transform, warped,
        fixed_segmentation, moving_segmentation, jacobian nodes and the qc dict). Raises
        JointRegSegError with a message naming the problem; the scene is then unchanged."""
        missing = self.missingDependencies()
        if missing:
            raise JointRegSegError(f"missing Python packages: {', '.join(missing)}; call "
                                   "JointRegSegLogic().installDependencies() first")
        job = self.start(moving, fixed, model, affine, refineIterations, device, python, guide)
        try:
            job.run.wait(progress, cancel)
        except BaseException:
            job.cancel()
            raise
        return self.finish(job, outputs, jacobian)

    # --- annotate & refine ------------------------------------------------------------------------
    @staticmethod
    def trainingCases(folder) -> list:
        from JointRegSegLib.training.finetune import list_cases
        try:
            return list(list_cases(folder, need_labels=False))
        except JointRegSegError:
            return []

    def addTrainingCase(self, folder, volume, segmentation, model=None):
        """Save a corrected case (image, label map by the model's label names, .seg.nrrd) into `folder`."""
        from JointRegSegLib.mrml import save_training_case
        card = read_card(model or default_model_path())
        return save_training_case(folder, volume, segmentation, card["labels"])

    @staticmethod
    def newModelPath(model) -> str:
        """A new file next to the user's models, never the original."""
        base = pathlib.Path(model or default_model_path())
        folder = pathlib.Path(os.environ.get("JOINTREGSEG_USER_MODELS", pathlib.Path.home() / "JointRegSegModels"))
        folder.mkdir(parents=True, exist_ok=True)
        index = 1
        while (folder / f"{base.stem}-ft{index}.safetensors").exists():
            index += 1
        return str(folder / f"{base.stem}-ft{index}.safetensors")

    def startFinetune(self, model, folder, output, steps=300, device="auto", python=None):
        from JointRegSegLib.worker import BackgroundRun
        args = ["finetune", "--init", model or default_model_path(), "--labelled", folder, "--out", output,
                "--steps", int(steps), "--device", device]
        return BackgroundRun(args, python=python)

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
        improved = bool(info.get("improved"))
        text = (f"Segmentation Dice on {info.get('measured_on', '?')}: "
                f"{before.get('segmentation_dice_mean', float('nan')):.3f} → "
                f"{after.get('segmentation_dice_mean', float('nan')):.3f}<br>"
                + (f"New model: {path}" if improved else
                   "The new model is not better; the panel keeps the previous model."))
        return text, improved

    # --- text for the panel --------------------------------------------------------------------
    @staticmethod
    def describeModel(path) -> str:
        try:
            card = read_card(path)
        except JointRegSegError as err:
            return f"<b>Cannot use this file:</b> {err}"
        labels = ", ".join(e["name"] for e in card["labels"] if int(e["value"]) != 0)
        training = card.get("training", {})
        data = card.get("data", {})
        sources = "; ".join(s.get("source", s.get("name", "")) for s in data.get("sources", []))
        grid = card["working_grid"]
        return (f"<b>{card.get('name', '')}</b>: {card.get('description', '')}<br>"
                f"Modality: {card.get('modality', '?')}; working grid {grid['size']} at {grid['spacing']} mm<br>"
                f"Labels: {labels}<br>"
                f"Training: {training.get('strategy', '?')}, {len(training.get('labelled_images', []))} labelled "
                f"images; data: {sources or '?'}")

    @staticmethod
    def describeQc(qc: dict) -> str:
        volumes = qc.get("fixed_volumes_ml", {})
        rows = "".join(f"<tr><td>{name}</td><td align='right'>{value:.1f}</td></tr>" for name, value in volumes.items())
        timing = qc.get("timing_s", {})
        return (f"Folding: {qc['folding_percent']:.4f} % of voxels (det J &le; 0)<br>"
                f"Jacobian determinant: {qc['jacobian_min']:.3f} to {qc['jacobian_max']:.3f}<br>"
                f"Time: {timing.get('total', float('nan')):.1f} s on {qc.get('device', '?')}<br>"
                f"<table><tr><th>structure (fixed)</th><th>ml</th></tr>{rows}</table>")


class JointRegSegTest(ScriptedLoadableModuleTest):
    """Slicer's self-test: the bundled sample pair through the embedded default model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_and_segment_sample_pair()

    def test_register_and_segment_sample_pair(self):
        from JointRegSegLib.models import REPO_ROOT
        samples = REPO_ROOT / "Resources" / "SampleData"
        moving = slicer.util.loadVolume(str(samples / "colin27_t1_brain_2mm.nii.gz"))
        fixed = slicer.util.loadVolume(str(samples / "itk_subject_t1_brain.nii.gz"))
        logic = JointRegSegLogic()
        logic.installDependencies(askConfirmation=False)
        results = logic.process(moving, fixed)
        self.assertLess(results.qc["folding_percent"], 0.1)
        self.assertEqual(results.fixed_segmentation.GetSegmentation().GetNumberOfSegments(),
                         len(results.qc["label_table"]) - 1)
        self.delayDisplay("JointRegSeg self-test passed")
