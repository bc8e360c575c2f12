"""3D Slicer module: segment any atlas label, or a region painted on the atlas, on the loaded volume;
propose the atlas labels a partial segmentation lacks, and export it as a training case.

Qt glue only. The MRML work is LabelConditionedSegLib.logic.SegmentationLogic (tested under pytest
with slicer-core); the Widget binds the panel to it and runs the computation in a worker thread.
"""
import contextlib
import importlib.util
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

HERE = Path(__file__).resolve().parent
HOMEPAGE = "https://github.com/label-conditioned-segmentation/SlicerLabelConditionedSeg"
# LabelConditionedSegLib.segmenters.BUNDLED_MODEL, which this file cannot import: it loads before PyTorch is installed.
# Scenes store the bundled model by this name, so that they open after an upgrade and on other machines.
BUNDLED_MODEL = "bundled"
TORCH_REQUIREMENT = ">=2.4"  # as in pyproject.toml


def resource(name: str) -> Path:
    """A file of Resources/: beside the module in a built extension, at the repository's top in a source tree."""
    candidates = [HERE / "Resources" / name, HERE.parent / "Resources" / name]
    return next((p for p in candidates if p.exists()), candidates[0])


class LabelConditionedSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "Label Conditioned Segmentation"
        parent.categories = ["Segmentation"]
        parent.dependencies = []
        parent.contributors = ["LCS for Slicer developers (Label Conditioned Segmentation project)"]
        parent.helpText = (
            "Pick atlas labels (or paint a new region on the atlas), press Apply, and get named, colored "
            "segments on the input volume. One network serves every label: it is conditioned on the atlas "
            "image and the chosen atlas label. 'Relabel missing organs' proposes the atlas labels a partial "
            "segmentation lacks, for you to accept or reject, and exports the scan and its segments as a training "
            f'case. <a href="{HOMEPAGE}#in-3d-slicer">Documentation</a>: the panel, scripting, the command line '
            "and training.")
        parent.acknowledgementText = (
            "Method: Ma, Lee and Sabuncu, 'Label Conditioned Segmentation', MIDL 2022. Demo atlas: Colin27 "
            "with the AAL labels (Tzourio-Mazoyer et al. 2002), from Debian's mricron-data.")
        parent.icon = qt.QIcon(str(resource("Icons/LabelConditionedSeg.png")))


@parameterNodeWrapper
class LabelConditionedSegParameterNode:
    """What the panel shows; each field is bound to the .ui widget whose SlicerParameterName matches."""

    inputVolume: vtkMRMLScalarVolumeNode
    checkpointPath: Path = Path(BUNDLED_MODEL)  # a .lcs file, or the bundled model by name
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    registration: Annotated[str, Choice(["affine", "deformable", "rigid", "none"])] = "affine"
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    keepProbabilities: bool = False
    replaceExisting: bool = False
    relabelSegmentation: vtkMRMLSegmentationNode  # the user's partial segmentation
    proposalPasses: Annotated[int, WithinRange(1, 64)] = 8
    keepUncertainty: bool = False
    proposalSegmentation: vtkMRMLSegmentationNode  # the proposals under review
    caseName: str = ""
    exportSegmentation: vtkMRMLSegmentationNode  # what Export writes (default: the last Apply's output)


_brokenTorch = None  # once checked: why the installed torch cannot be used ("" when it can), until Slicer restarts


def torchMissing() -> bool:
    return importlib.util.find_spec("torch") is None


def torchProblem() -> str:
    """Why PyTorch cannot be used, "" when it can. Imported here, never when the module loads, so that the module
    loads in a Slicer without PyTorch; a broken install (OSError or ImportError from a missing library) is reported
    in the panel instead of breaking it."""
    global _brokenTorch
    if torchMissing():
        return "PyTorch is not installed yet: press Install PyTorch."
    if _brokenTorch is None:
        # its version first: a torch older than LCS needs may import, then fail with a message that hides the cause
        from LabelConditionedSegLib.torch_version import installed_torch_problem
        _brokenTorch = installed_torch_problem()
    if not _brokenTorch:
        try:
            import torch  # noqa: F401
        except Exception as error:
            _brokenTorch = (f"PyTorch is installed but does not load ({error}). Reinstall it with the PyTorch Utils "
                            "module (Uninstall, restart Slicer, Install), then restart Slicer.")
    return _brokenTorch


@contextlib.contextmanager
def showErrors(message: str):
    """Show an error in one message box with its traceback, and go on after the block. Unlike
    slicer.util.tryWithErrorDisplay, which re-raises (Slicer 5.6 to 5.10): the error would then be printed again
    by PythonQt, and the clean-up after the block skipped."""
    slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    except Exception as error:
        slicer.app.restoreOverrideCursor()
        slicer.util.errorDisplay(f"{message}\n\n{error}", detailedText=traceback.format_exc())
    else:
        slicer.app.restoreOverrideCursor()


class LabelConditionedSegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: PyTorch's installation, then SegmentationLogic, which does the work."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    @property
    def core(self):
        """LabelConditionedSegLib.logic.SegmentationLogic, imported once PyTorch loads."""
        if self._core is None:
            problem = torchProblem()
            if problem:
                raise RuntimeError(problem)
            from LabelConditionedSegLib.logic import SegmentationLogic
            self._core = SegmentationLogic(slicer.mrmlScene)
        return self._core

    def process(self, inputVolume, labels, outputSegmentation=None, checkpointPath=None, **options):
        """See SegmentationLogic.process; None, "" or "bundled" is the bundled demo model."""
        return self.core.process(inputVolume, labels, outputSegmentation, checkpointPath, **options)

    def cleanup(self):
        """Segment observers off, caches emptied (when the Lib was ever loaded)."""
        if self._core is not None:
            self._core.cleanup()

    @staticmethod
    def installTorch() -> None:
        """Install PyTorch with the PyTorch extension (call it once the user has agreed). Raises when it fails:
        PyTorchUtilsLogic.installTorch raises then; it returns None only when its own prompt, skipped here, is
        cancelled. Never under --testing, where Slicer's confirmation prompts answer OK by themselves."""
        if slicer.app.testingEnabled():
            raise RuntimeError("PyTorch is not installed, and a test installs nothing.")
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("Install the 'PyTorch' extension with the Extensions Manager, restart Slicer and "
                               "try again.") from None
        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)

    @staticmethod
    def usableDevice(requested: str) -> tuple[str, str]:
        """The device to run on and a notice when it differs from the one asked for (no GPU: the CPU)."""
        import torch
        if requested == "cuda" and not torch.cuda.is_available():
            return "cpu", "No CUDA GPU is available here: running on the CPU."
        return requested, ""

    @staticmethod
    def describeDevices() -> str:
        """What can run LCS here. Starts CUDA (seconds): call it off the main thread."""
        import torch
        if torch.cuda.is_available():
            return f"CUDA available: {torch.cuda.get_device_name(0)}"
        return "No CUDA GPU found: LCS runs on the CPU."


class Background:
    """`work()` in a worker thread (LabelConditionedSegLib.jobs.Worker), then `done(result, failure)` on the main
    thread, where a QTimer polls it (calling `tick()` meanwhile): Qt and MRML calls stay on the main thread. `failure`
    is a jobs.Failure (text only) or None. When the work ends, or on `stop`, the timer lets go: PythonQt's signal
    receiver holds a connected callable by a C++ reference the cycle collector cannot see (PythonQtSignalTarget,
    and PythonQtInstanceWrapper has no tp_traverse; Slicer 5.6 to 5.10), so a connected Background would keep its
    job, GPU memory included, for good."""

    def __init__(self, work, done, tick=None):
        from LabelConditionedSegLib.jobs import Worker
        self._done, self._tick = done, tick
        self._worker = Worker(work)
        self._timer = qt.QTimer(slicer.app)  # a parent: deleted later by Qt, never inside its own timeout signal
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)
        self._timer.start()

    def _poll(self):
        if self._tick:
            self._tick()
        if self._worker.running:
            return
        done, (result, failure) = self._done, self._worker.take()
        self.stop()
        done(result, failure)

    def stop(self):
        """No `done` call (a job once cancelled: its thread finishes on its own); the timer is disconnected and goes,
        and the callbacks are dropped."""
        if self._timer is not None:
            self._timer.stop()
            self._timer.timeout.disconnect(self._poll)
            self._timer.deleteLater()
        self._timer = self._done = self._tick = None


class LabelConditionedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the logic; models load and jobs compute in worker threads."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None  # the running job, a Background
        self._loader = None  # the model being loaded, a Background
        self._models = {}  # (checkpoint, its file's version) -> "" once loaded, or why it cannot be used
        self._listedCheckpoint = None
        self._started = 0.0
        self._progress = (0.0, "")
        self._notices = []
        self._missingText = ""  # the line above the missing labels, before the estimate
        self._cancel = threading.Event()
        self._paintSession = None  # while painting on the atlas: what onPaintLabel changed, for endPaintSession

    # ---- set-up and the parameter node -----------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource("UI/LabelConditionedSeg.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LabelConditionedSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.ui.labelFilterLineEdit.textChanged.connect(self.filterLabels)
        self.ui.labelListWidget.itemSelectionChanged.connect(self.updateButtons)
        self.ui.selectAllButton.clicked.connect(lambda: self.selectVisibleLabels(True))
        self.ui.selectNoneButton.clicked.connect(lambda: self.selectVisibleLabels(False))
        self.ui.paintLabelButton.clicked.connect(self.onPaintLabel)
        self.ui.bundledModelButton.clicked.connect(self.onUseBundledModel)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.showRegisteredAtlasButton.clicked.connect(self.onShowRegisteredAtlas)
        self.ui.volumeTableWidget.setColumnCount(4)
        self.ui.volumeTableWidget.setHorizontalHeaderLabels(["Segment", "mL", "Atlas mL", "Check"])
        self.ui.proposeButton.clicked.connect(self.onProposeOrCancel)
        self.ui.proposalListWidget.itemSelectionChanged.connect(self.updateButtons)
        self.ui.missingLabelListWidget.itemSelectionChanged.connect(self.describeProposalRun)
        self.ui.acceptProposalButton.clicked.connect(lambda: self.onReview(accept=True))
        self.ui.rejectProposalButton.clicked.connect(lambda: self.onReview(accept=False))
        self.ui.exportFolderPathLineEdit.currentPathChanged.connect(self.updateButtons)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.batchSceneButton.clicked.connect(self.onBatchScene)
        self.ui.batchFolderButton.clicked.connect(self.onBatchFolder)
        for path in (self.ui.batchFolderPathLineEdit, self.ui.batchOutputPathLineEdit):
            path.currentPathChanged.connect(self.updateButtons)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self):
        self._cancel.set()
        for background in (self._worker, self._loader):
            if background:
                background.stop()
        self.setParameterNode(None)
        self.removeObservers()
        self.logic.cleanup()

    def onReload(self):
        """Slicer's Reload re-reads this file only (slicer.util.reloadScriptedModule, 5.6 to 5.10): the Lib's modules
        are forgotten too, so that the new widget imports their current code."""
        for name in [n for n in sys.modules if n.split(".")[0] == "LabelConditionedSegLib"]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.endPaintSession()
        self.initializeParameterNode()

    def exit(self):
        """Hidden: stop following the parameter node and the listed segmentations (enter() resumes). The panel's
        widgets stay bound to the parameter node (see setParameterNode)."""
        self.unfollowParameterNode()
        if not torchProblem():
            self.logic.core.stopObservingSegments()

    def onSceneStartClose(self, caller, event):
        """The panel stays bound: the module's singleton parameter node outlives the close (reset, its parameters
        written again with their defaults by the wrapper), and binding a new wrapper would leave the old one observing
        it for good (connectParametersToGui adds an observer that disconnectGui does not remove, 5.6 to 5.10)."""
        self._cancel.set()
        self._paintSession = None  # the views and Segment Editor's node are reset with the scene
        self.unfollowParameterNode()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        """A loaded scene may hold atlas nodes (they keep their attributes)."""
        if self.parent.isEntered:
            self.keepAtlasNodesOut()

    def initializeParameterNode(self):
        """Bind the panel to the module's parameter node (one wrapper per node: see onSceneStartClose), follow it, and
        show its state."""
        node = self.logic.getParameterNode()
        if self._parameterNode is None or self._parameterNode.parameterNode is not node:
            self.setParameterNode(LabelConditionedSegParameterNode(node))
        if not self._parameterNode.inputVolume:  # a scan, never an atlas image (see keepAtlasNodesOut)
            self._parameterNode.inputVolume = (slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
                                               if torchProblem() else self.logic.core.defaultInputVolume())
        if not self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified):
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.refreshPanel()

    def setParameterNode(self, parameterNode):
        """Bind the panel's widgets to `parameterNode` (None: unbind), once, not at every enter(). The binding's tag
        comes from connectParametersToGui, which returns it in Slicer 5.6 to 5.10; connectGui returns None before
        5.10, so that disconnectGui could not unbind, and each new binding's combo boxes, cleared and refilled,
        made the old one write their first choice into the node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.unfollowParameterNode()
        self._parameterNode, self._parameterNodeGuiTag = parameterNode, None
        if parameterNode:
            widgets = {w.property("SlicerParameterName"): w for w in vars(self.ui).values()
                       if w.property("SlicerParameterName")}  # as connectGui finds them
            self._parameterNodeGuiTag = parameterNode.connectParametersToGui(widgets)

    def unfollowParameterNode(self):
        if self._parameterNode and self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                                    self.onParameterNodeModified):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onParameterNodeModified(self, *unused):
        """After the widgets' values reached the node: the bundled model is stored by name, and the lists follow
        the model and the segmentations chosen (read from the node, so the new values)."""
        p = self._parameterNode
        if p is None:
            return
        if not torchProblem():
            reference = self.logic.core.checkpointReference(str(p.checkpointPath))
            if reference != str(p.checkpointPath):
                p.checkpointPath = Path(reference)  # modifies the node: this runs again
                return
            self.followSegments()
        if self.checkpoint() != self._listedCheckpoint:
            self.refreshLabels()
        self.refreshRelabel()
        self.refreshResult()

    def refreshPanel(self):
        """Everything the panel shows, from the parameter node, the model and the scene."""
        self.keepAtlasNodesOut()
        self.refreshLabels()
        self.onParameterNodeModified()

    def updateButtons(self, *unused):
        if self._worker is not None:
            return
        p = self._parameterNode
        if torchProblem():
            self.ui.applyButton.text = "Install PyTorch" if torchMissing() else "Apply"
            self.ui.applyButton.enabled = torchMissing()
            self.ui.applyButton.toolTip = torchProblem()
            for button in (self.ui.undoButton, self.ui.proposeButton, self.ui.acceptProposalButton,
                           self.ui.rejectProposalButton, self.ui.exportButton, self.ui.batchSceneButton,
                           self.ui.batchFolderButton):
                button.enabled = False
            return
        ready = bool(p and p.inputVolume and self.selectedLabels())
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = "Segment the selected labels" if ready else "Select an input volume and atlas labels"
        self.ui.undoButton.enabled = self.logic.core.canUndo()
        partial = bool(p and p.inputVolume and p.relabelSegmentation)
        self.ui.proposeButton.text = "Propose missing labels"
        self.ui.proposeButton.enabled = partial and self.ui.missingLabelListWidget.count > 0
        reviewing = bool(p and p.proposalSegmentation and self.selectedProposals())
        self.ui.acceptProposalButton.enabled = reviewing and bool(p.relabelSegmentation)
        self.ui.rejectProposalButton.enabled = reviewing
        # no segmentation, or an empty one, exports the scan unlabelled
        exportable = bool(p and p.inputVolume and p.caseName)
        self.ui.exportButton.enabled = exportable and bool(self.ui.exportFolderPathLineEdit.currentPath)
        self.updateBatchButtons()

    def onInstallTorch(self):
        """Ask, then install PyTorch; Cancel is no error. Either way the panel then shows where PyTorch stands."""
        if slicer.util.confirmOkCancelDisplay(
                "Label Conditioned Segmentation needs PyTorch, which is not installed yet.\n\n"
                "Install it now? The PyTorch extension picks a build that fits this computer's GPU (or the CPU). "
                "The download can take several minutes.", windowTitle="Install PyTorch"):
            with showErrors("PyTorch could not be installed; see the Python console, or use the PyTorch Utils module."):
                self.logic.installTorch()
        self.refreshPanel()

    # ---- model and atlas (Lib: segmenters.py, atlas.py) ------------------------------------------
    def onUseBundledModel(self):
        """The Model field cannot be set back to the bundled model: ctkPathLineEdit passes on only text its "*.lcs"
        validator accepts (ctkPathLineEdit::updateHasValidInput, CTK as Slicer 5.6 to 5.10 pin it), so typing
        "bundled", or clearing the field, never reached the parameter node."""
        self._parameterNode.checkpointPath = Path(BUNDLED_MODEL)

    def checkpoint(self) -> str:
        """The chosen model as the logic takes it: "bundled" or a path."""
        return str(self._parameterNode.checkpointPath) if self._parameterNode else BUNDLED_MODEL

    def modelProblem(self) -> str:
        """"" when the chosen model is loaded; otherwise what the panel says instead. A model is loaded in a worker
        thread (one at a time), with the CUDA query, and the panel refreshed then: opening the panel or choosing a
        model never loads one, nor starts CUDA, on the main thread."""
        problem = torchProblem()
        if problem:
            return problem
        checkpoint = self.checkpoint()
        try:
            key = (checkpoint, self.logic.core.checkpointVersion(checkpoint))  # a rewritten file is another model
        except Exception as error:  # a deleted file: said here, in the panel, not raised in observer or timer callbacks
            return f"Cannot use this model: {error}"
        if key in self._models:
            return self._models[key]
        if self._loader is None:
            core = self.logic.core

            def load():
                core.segmenter(checkpoint, "cpu")
                core.atlasIdentity(checkpoint)  # hashes the atlas once (atlasFor needs it): here, not on the main thread
                return self.logic.describeDevices()

            self._loader = Background(load, lambda devices, error: self.onModelLoaded(key, devices, error))
        return "Loading the model..."

    def onModelLoaded(self, key: tuple, devices: str, error):
        self._loader = None
        self._models[key] = f"Cannot use this model: {error.message}" if error else ""
        if devices:
            self.ui.deviceInfoLabel.text = devices
        self.refreshPanel()

    def refreshLabels(self):
        """Trained labels of the checkpoint, then regions painted on the atlas; keeps the selection."""
        widget = self.ui.labelListWidget
        selected = set(self.selectedLabels())
        widget.clear()
        self._listedCheckpoint = checkpoint = self.checkpoint()
        self.ui.bundledModelButton.enabled = checkpoint != BUNDLED_MODEL
        problem = self.modelProblem()
        if problem:
            self.ui.checkpointInfoLabel.text = problem
            self.updateButtons()
            return
        core = self.logic.core
        model = core.segmenter(checkpoint, "cpu").checkpoint
        self.ui.checkpointInfoLabel.text = model.description
        entries = [(l.name, str(l.value), l.color) for l in model.label_table]
        atlas = core.atlasFor(checkpoint)
        for segmentId in core.paintedSegmentIds(checkpoint):
            segment = atlas.GetSegmentation().GetSegment(segmentId)
            entries.append((f"{segment.GetName()} (painted)", segmentId, [round(255 * c) for c in segment.GetColor()]))
        for text, key, color in entries:
            addListItem(widget, text, key, color, key in selected)
        self.filterLabels(self.ui.labelFilterLineEdit.text)
        self.updateButtons()

    def selectedLabels(self) -> list:
        return [item.data(qt.Qt.UserRole) for item in self.ui.labelListWidget.selectedItems()]

    def filterLabels(self, text: str):
        text = text.strip().lower()
        for i in range(self.ui.labelListWidget.count):
            item = self.ui.labelListWidget.item(i)
            item.setHidden(bool(text) and text not in item.text().lower())

    def selectVisibleLabels(self, selected: bool):
        for i in range(self.ui.labelListWidget.count):
            item = self.ui.labelListWidget.item(i)
            if not item.isHidden():
                item.setSelected(selected)

    def onPaintLabel(self):
        """Atlas image and labels in the scene, a new segment on them, and Segment Editor opened on it. What this
        changes outside the module (the views' scans, Segment Editor's overwrite mode) is put back by endPaintSession
        when the user comes back to the module."""
        with showErrors("Could not open the atlas for painting."):
            atlas = self.logic.core.loadAtlas(self.checkpoint())
            self.keepAtlasNodesOut()
            self.followSegments()
            atlasVolume = atlas.GetNodeReference(atlas.GetReferenceImageGeometryReferenceRole())
            segmentId = atlas.GetSegmentation().AddEmptySegment("", "New atlas region", [1.0, 0.85, 0.2])
            views = {v.GetID(): v.GetBackgroundVolumeID() for v in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")}
            slicer.util.setSliceViewerLayers(background=atlasVolume, fit=True)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editorNode = editor.mrmlSegmentEditorNode()
            if self._paintSession is None:  # a second Paint before coming back keeps the first one's state
                self._paintSession = (editorNode.GetID(), editorNode.GetOverwriteMode(), views)
            # Segment Editor's default (OverwriteAllSegments, 5.6 to 5.10) would erase atlas labels under the brush
            editorNode.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
            editor.setSegmentationNode(atlas)
            editor.setSourceVolumeNode(atlasVolume)
            editor.setCurrentSegmentID(segmentId)
            editor.setActiveEffectByName("Paint")
            slicer.util.showStatusMessage("Paint the new region on the atlas, rename it, then come back and Apply.", 8000)

    def endPaintSession(self):
        """Back from painting: Segment Editor's overwrite mode and each view's scan as they were before."""
        if self._paintSession is None:
            return
        (editorNodeId, overwriteMode, views), self._paintSession = self._paintSession, None
        editorNode = slicer.mrmlScene.GetNodeByID(editorNodeId)
        if editorNode is not None:
            editorNode.SetOverwriteMode(overwriteMode)
        for viewId, volumeId in views.items():
            view = slicer.mrmlScene.GetNodeByID(viewId)
            if view is not None and (volumeId is None or slicer.mrmlScene.GetNodeByID(volumeId) is not None):
                view.SetBackgroundVolumeID(volumeId)

    def keepAtlasNodesOut(self):
        """Atlas images and labels are neither a scan to segment nor an output: hidden from the panel's own node
        selectors (qMRMLSortFilterProxyModel.hiddenNodeIDs, 5.6 to 5.10), and never the input volume (the input
        selector picks a node added to an empty scene by itself, as the atlas image can be)."""
        if torchProblem():
            return
        core, p = self.logic.core, self._parameterNode
        ids = core.atlasNodeIds()
        for selector in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector,
                         self.ui.relabelSegmentationSelector, self.ui.exportSegmentationSelector):
            selector.sortFilterProxyModel().setHiddenNodeIDs(ids)
        if p is None:
            return
        for field in ("outputSegmentation", "relabelSegmentation", "exportSegmentation"):
            node = getattr(p, field)
            if node is not None and node.GetID() in ids:
                setattr(p, field, None)
        if p.inputVolume is None or p.inputVolume.GetID() in ids:  # hiding the current node may have cleared it
            p.inputVolume = core.defaultInputVolume()

    # ---- segmentation (Lib: apply.py) ------------------------------------------------------------
    def onApplyOrCancel(self):
        if torchMissing():
            self.onInstallTorch()
            return
        p = self._parameterNode
        self.runInBackground(self.ui.applyButton, lambda core, device: core.start(
            p.inputVolume, self.selectedLabels(), self.checkpoint(), device, p.registration, p.threshold,
            p.keepProbabilities), self.finishSegmentation)

    def finishSegmentation(self, job) -> str:
        p = self._parameterNode
        p.outputSegmentation = self.logic.core.finish(job, p.outputSegmentation, p.replaceExisting)
        p.exportSegmentation = p.outputSegmentation  # what Export writes by default: the last output
        self.refreshResult()
        return f"Done: {len(job.conditions)} label(s)"

    def refreshResult(self):
        """Beside the output: its registration check's warning, the registered atlas button, the run's volumes."""
        output = self._parameterNode.outputSegmentation if self._parameterNode else None
        core = None if torchProblem() else self.logic.core
        self.ui.checkWarningLabel.text = core.checkWarning(output) if core else ""
        self.ui.showRegisteredAtlasButton.enabled = bool(core and core.canShowRegisteredAtlas(output))
        rows = core.runVolumes(output) if core and output else []
        table = self.ui.volumeTableWidget
        table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate([row["name"], f"{row['volume_ml']:.2f}", f"{row['atlas_ml']:.2f}", row["flag"]]):
                table.setItem(i, j, qt.QTableWidgetItem(text))

    def onShowRegisteredAtlas(self):
        with showErrors("Could not show the registered atlas."):
            outline = self.logic.core.showRegisteredAtlas(self._parameterNode.outputSegmentation)
            self.ui.statusLabel.text = (f"Added {outline.GetName()}: the atlas brain's outline where the registration "
                                        "put it. Undo last run removes it.")
        self.updateButtons()

    # ---- batches (Lib: batch.py) -----------------------------------------------------------------
    def updateBatchButtons(self):
        labels = bool(self.selectedLabels())
        self.ui.batchSceneButton.text = "Segment every scan in the scene"
        self.ui.batchSceneButton.enabled = labels  # a scene without scans is refused at the start, in words
        self.ui.batchFolderButton.text = "Segment the folder"
        self.ui.batchFolderButton.enabled = labels and bool(self.ui.batchFolderPathLineEdit.currentPath
                                                            and self.ui.batchOutputPathLineEdit.currentPath)

    def onBatchScene(self):
        p = self._parameterNode
        self.runInBackground(self.ui.batchSceneButton, lambda core, device: core.startSceneBatch(
            self.selectedLabels(), self.checkpoint(), device, p.registration, p.threshold), self.finishBatch)

    def onBatchFolder(self):
        p = self._parameterNode
        self.runInBackground(self.ui.batchFolderButton, lambda core, device: core.startFolderBatch(
            self.ui.batchFolderPathLineEdit.currentPath, self.ui.batchOutputPathLineEdit.currentPath,
            self.selectedLabels(), self.checkpoint(), device, p.registration, p.threshold), self.finishBatch)

    def finishBatch(self, job) -> str:
        """The batch's results and its table, shown in a layout with a table view (as Segment Statistics does)."""
        table = self.logic.core.finishBatch(job)
        layouts = slicer.app.layoutManager()
        layouts.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layouts.layout))
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        failed = sum(bool(o.failed) for o in job.outcomes)
        return (f"{'Cancelled after' if job.cancelled else 'Done:'} {len(job.outcomes) - failed} scan(s)"
                f"{f', {failed} failed' if failed else ''}; see the table {table.GetName()}")

    # ---- undo (Lib: undo.py) ---------------------------------------------------------------------
    def onUndo(self):
        """Take back the last Apply, Propose, Accept or Reject (Slicer's own Undo does not cover them)."""
        with showErrors("Nothing was undone."):
            self.ui.statusLabel.text = self.logic.core.undoLastRun()
        self.refreshLists()
        self.refreshResult()

    # ---- relabel missing organs (Lib: proposals.py) ----------------------------------------------
    def refreshRelabel(self):
        """The labels missing from the chosen segmentation and the proposals under review."""
        p = self._parameterNode
        segmentation = p.relabelSegmentation if p else None
        proposals = p.proposalSegmentation if p else None
        picked, selected = set(self.pickedMissingLabels()), set(self.selectedProposals())
        self.ui.missingLabelListWidget.clear()
        self.ui.proposalListWidget.clear()
        problem = self.modelProblem()
        if problem or not segmentation:
            self.ui.missingLabelsLabel.text = problem or "Select the segmentation to complete (segments named like atlas labels)."
            self.ui.matchesLabel.text = self.ui.proposalInfoLabel.text = ""
            self.updateButtons()
            return
        core = self.logic.core
        table = core.segmenter(self.checkpoint(), "cpu").checkpoint.label_table
        missing = core.missingLabels(segmentation, self.checkpoint())
        self._missingText = f"{len(missing)} of {len(table)} atlas labels missing from {segmentation.GetName()}."
        self.ui.missingLabelsLabel.text = self._missingText
        similar = self.similarMatches()
        self.ui.matchesLabel.text = ("Taken for atlas labels (check): " + "; ".join(similar)) if similar else ""
        self.ui.proposalInfoLabel.text = (f"Proposed where a label's mean probability reaches {core.proposalThreshold} "
                                          "(and no other missing label's is higher). "
                                          + core.uncertaintyMeaning(p.proposalPasses))
        for name in missing:
            addListItem(self.ui.missingLabelListWidget, name, name, table.resolve(name).color, name in picked)
        self.describeProposalRun()
        if proposals:
            segments = proposals.GetSegmentation()
            for segmentId, uncertainty in core.listProposals(proposals):
                segment = segments.GetSegment(segmentId)
                text = segment.GetName() if uncertainty is None else f"{segment.GetName()}   uncertainty {uncertainty:.3f}"
                addListItem(self.ui.proposalListWidget, text, segmentId, [round(255 * c) for c in segment.GetColor()],
                            segmentId in selected)
        self.updateButtons()

    def describeProposalRun(self, *unused):
        """How many labels Propose runs (the selected, else all missing) and about how long it takes."""
        p = self._parameterNode
        count = len(self.pickedMissingLabels()) or self.ui.missingLabelListWidget.count
        if p is None or not p.relabelSegmentation or not count or self.modelProblem():
            return
        device = self.logic.usableDevice(p.device)[0]
        seconds = self.logic.core.proposalSeconds(count, p.proposalPasses, device, p.inputVolume, self.checkpoint(),
                                                  p.registration)
        self.ui.missingLabelsLabel.text = (f"{self._missingText} Propose runs {count} (the selected, else all): about "
                                           f"{seconds:.0f} s on {device}.")

    def similarMatches(self) -> list:
        """The user's segments taken for atlas labels by terminology code or a similar name, as "name -> label"."""
        p = self._parameterNode
        matches = self.logic.core.matchedSegments(p.relabelSegmentation, self.checkpoint())
        return [f"{m.segmentName} -> {m.label} ({m.how})" for m in matches if m.how != "name"]

    def pickedMissingLabels(self) -> list:
        return [item.data(qt.Qt.UserRole) for item in self.ui.missingLabelListWidget.selectedItems()]

    def selectedProposals(self) -> list:
        return [item.data(qt.Qt.UserRole) for item in self.ui.proposalListWidget.selectedItems()]

    def onProposeOrCancel(self):
        """Propose the missing labels selected in the list (all of them when none is selected)."""
        p = self._parameterNode
        picked = self.pickedMissingLabels()
        similar = [] if self._worker is not None else self.similarMatches()
        if similar and not slicer.util.confirmOkCancelDisplay(
                "These segments are taken for atlas labels, which are not proposed:\n" + "\n".join(similar) +
                "\n\nRename a segment that is something else. Propose the missing labels?"):
            return
        self.runInBackground(self.ui.proposeButton, lambda core, device: core.startProposals(
            p.inputVolume, p.relabelSegmentation, self.checkpoint(), device, p.proposalPasses, p.registration,
            p.keepUncertainty, picked or None), self.finishProposals)

    def finishProposals(self, job) -> str:
        self._parameterNode.proposalSegmentation = self.logic.core.finishProposals(job)
        return f"Proposed {len(job.meanUncertainty)} of {len(job.conditions)} missing label(s); accept or reject them"

    def onReview(self, accept: bool):
        """Accept the selected proposals into the user's segmentation, or reject them; refusals are listed at the end."""
        p, core = self._parameterNode, self.logic.core
        selected, refused = self.selectedProposals(), []
        with core.undoGroup(f"{'accepting' if accept else 'rejecting'} {len(selected)} proposal(s)"):  # one undo step
            for segmentId in selected:
                try:
                    if accept:
                        core.acceptProposal(p.proposalSegmentation, segmentId, p.relabelSegmentation)
                    else:
                        core.rejectProposal(p.proposalSegmentation, segmentId)
                except Exception as error:
                    refused.append(str(error))
        self.refreshLists()
        if refused:
            slicer.util.errorDisplay("\n".join(refused), windowTitle="Some proposals were not accepted")

    # ---- export for training (Lib: export.py) ----------------------------------------------------
    def onExport(self):
        """Write the scan and Export's own segmentation (not the Relabel section's) as a training case; asks before
        writing an unlabelled case and before replacing a case of that name."""
        p, core = self._parameterNode, self.logic.core
        folder = self.ui.exportFolderPathLineEdit.currentPath  # read as text: an empty path must not become "."
        segmentation = p.exportSegmentation
        if ((segmentation is None or not segmentation.GetSegmentation().GetNumberOfSegments())
                and not slicer.util.confirmOkCancelDisplay(
                    f"No segments to export: write {p.caseName!r} as an unlabelled case (the scan only, for lcs pretrain "
                    "and lcs train --adversarial)?", windowTitle="Export an unlabelled case")):
            return
        overwrite = bool(folder) and core.caseExists(folder, p.caseName)
        if overwrite and not slicer.util.confirmOkCancelDisplay(f"{folder} has a case {p.caseName!r} already. Replace it?"):
            return
        self._notices[:] = []
        core.messages = self._notices.append
        with showErrors("Could not export the case for training."):
            core.exportForTraining(p.inputVolume, segmentation, folder, p.caseName, self.checkpoint(), overwrite)
            self.ui.exportFolderPathLineEdit.addCurrentPathToHistory()
            self.ui.statusLabel.text = "  ".join([f"Exported case {p.caseName} to {folder}."] + self._notices)

    # ---- jobs in the background (Lib: jobs.py) ---------------------------------------------------
    def runInBackground(self, button, start, finish):
        """Start a job on the main thread (`start(core, device)`), compute it in a worker thread while `button`
        reads Cancel, then write its result with `finish(job)` on the main thread. Pressed again: cancel (not within
        a double click's time of the start)."""
        if time.time() - self._started < qt.QApplication.doubleClickInterval() / 1000:
            return  # a double click's second click (a QPushButton emits clicked for each): not a Cancel, nor a rerun
        if self._worker is not None:
            self._cancel.set()
            self.ui.statusLabel.text = "Cancelling..."
            return
        try:
            device, notice = self.logic.usableDevice(self._parameterNode.device)
            self._notices[:] = [notice] if notice else []
            core = self.logic.core
            core.messages = self._notices.append  # called from the worker too; shown by showProgress
            job = start(core, device)
        except Exception as error:
            slicer.util.errorDisplay(f"Cannot start: {error}", detailedText=traceback.format_exc())
            return
        self._cancel.clear()
        self._progress, self._started = (0.0, "starting"), time.time()
        self._worker = Background(lambda: job.run(self._report, self._cancel.is_set),
                                  lambda result, error: self.onJobDone(job, finish, error), self.showProgress)
        for other in (self.ui.applyButton, self.ui.proposeButton, self.ui.undoButton, self.ui.batchSceneButton,
                      self.ui.batchFolderButton):
            other.enabled = other is button
        button.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()

    def _report(self, fraction: float, message: str):
        """Worker thread: progress is only stored here, and shown by showProgress."""
        self._progress = (fraction, message)

    def showProgress(self):
        fraction, message = self._progress
        self.ui.progressBar.value = int(100 * fraction)
        if not self._cancel.is_set():
            self.ui.statusLabel.text = "  ".join([message] + self._notices)

    def onJobDone(self, job, finish, error):
        """Main thread: write the finished job into the scene, or say why nothing was written."""
        self._worker = None
        self.ui.progressBar.hide()
        batch = hasattr(job, "outcomes")  # a batch keeps, and its finish writes, the scans done before a Cancel
        if (self._cancel.is_set() and not batch) or (error is not None and error.cancelled):
            self.ui.statusLabel.text = "Cancelled; the scene is as it was."
        elif error is not None:
            self.ui.statusLabel.text = f"Failed: {error.message}"
            slicer.util.errorDisplay(f"The run failed: {error.message}", detailedText=error.details)
        else:
            self.ui.statusLabel.text = "Failed: the result could not be added to the scene."
            with showErrors("Could not add the result to the scene."):
                done = finish(job)
                seconds = time.time() - self._started
                self.ui.statusLabel.text = "  ".join([f"{done} in {seconds:.1f} s on {job.segmenter.device}."] + self._notices)
                self.ui.deviceInfoLabel.text = (f"{self.logic.describeDevices()} Last run: {job.segmenter.device}. "
                                                f"{self.logic.core.cacheDescription()}")
        self.updateButtons()

    # ---- segment observers (Lib: observers.py) ---------------------------------------------------
    def followSegments(self):
        """While the panel is shown, observe the segments of the segmentations it lists (the one to complete, the
        proposals, the chosen model's atlas once that model is loaded) and no others, so that their lists follow."""
        core, p = self.logic.core, self._parameterNode
        core.stopObservingSegments()
        if p is None or not self.parent.isEntered:
            return
        nodes = [p.relabelSegmentation, p.proposalSegmentation]
        if not self.modelProblem():
            nodes.append(core.atlasFor(self.checkpoint()))
        for node in nodes:
            if node is not None:
                core.observeSegments(node, self.refreshLists)

    def refreshLists(self, *unused):
        """The label lists, after their segments changed."""
        self.refreshLabels()
        self.refreshRelabel()


def addListItem(widget, text: str, key: str, color, selected: bool = False):
    """A list entry with a color swatch; `key` (what the logic is given) is kept in its UserRole data."""
    item = qt.QListWidgetItem(text)
    item.setData(qt.Qt.UserRole, key)
    pixmap = qt.QPixmap(14, 14)
    pixmap.fill(qt.QColor(*color))
    item.setIcon(qt.QIcon(pixmap))
    widget.addItem(item)
    item.setSelected(selected)


class LabelConditionedSegTest(ScriptedLoadableModuleTest):
    """Reload & Test: the panel keeps its settings across modules; the whole flow on Slicer's MRHead sample with
    the bundled demo model (skipped without PyTorch: a test installs nothing)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_settings_survive_leaving_the_module()
        self.setUp()
        self.test_pick_paint_relabel_export_undo_and_cancel_on_MRHead()

    def test_settings_survive_leaving_the_module(self):
        """Slicer 5.6 and 5.8 reset Device and Registration on re-entering when the panel was bound at each enter."""
        slicer.util.selectModule("LabelConditionedSeg")
        widget = slicer.modules.labelconditionedseg.widgetRepresentation().self()
        widget._parameterNode.device, widget._parameterNode.registration = "cpu", "rigid"
        for _ in range(2):
            slicer.util.selectModule("Data")
            slicer.util.selectModule("LabelConditionedSeg")
        self.assertEqual((widget._parameterNode.device, widget._parameterNode.registration), ("cpu", "rigid"))
        self.assertEqual((widget.ui.deviceComboBox.currentText, widget.ui.registrationComboBox.currentText), ("cpu", "rigid"))

    def test_pick_paint_relabel_export_undo_and_cancel_on_MRHead(self):
        if torchProblem():
            self.skipTest(torchProblem())
        import numpy as np
        import SampleData
        from LabelConditionedSegLib.checkpoint import BUNDLED
        from LabelConditionedSegLib.errors import Cancelled

        self.delayDisplay("Loading MRHead")
        volume = SampleData.downloadSample("MRHead")
        logic = LabelConditionedSegLogic()
        self.assertEqual(logic.core.checkpointReference(str(BUNDLED)), BUNDLED_MODEL)
        picked = ["Hippocampus_L", "Precentral_R"]

        self.delayDisplay("Segmenting two atlas labels")
        segmentation = logic.process(volume, picked)
        segments = segmentation.GetSegmentation()
        self.assertEqual([segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())], picked)
        voxel_ml = np.prod(volume.GetSpacing()) / 1000
        volumes = {}
        for name in picked:
            segmentId = segments.GetSegmentIdBySegmentName(name)
            array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            volumes[name] = array.sum() * voxel_ml
        self.assertTrue(1 < volumes["Hippocampus_L"] < 20, volumes)  # a human hippocampus holds about 3-5 ml
        self.assertTrue(5 < volumes["Precentral_R"] < 80, volumes)

        self.delayDisplay("Another label reuses the encoded volume")
        start = time.time()
        logic.process(volume, ["Thalamus_L"], segmentation)
        self.assertEqual(logic.core.encodings, 1)
        self.assertEqual(segments.GetNumberOfSegments(), 3)  # the first two were kept
        self.delayDisplay(f"Second label in {time.time() - start:.1f} s")

        self.delayDisplay("Segmenting a region painted on the atlas")
        atlas = logic.core.loadAtlas(BUNDLED_MODEL)
        atlasVolume = atlas.GetNodeReference(atlas.GetReferenceImageGeometryReferenceRole())
        source = slicer.util.arrayFromSegmentBinaryLabelmap(
            atlas, atlas.GetSegmentation().GetSegmentIdBySegmentName("Precentral_R"), atlasVolume)
        painted = source.copy()
        painted[: int(np.median(np.nonzero(source)[0]))] = 0  # the upper half: a new sub-region
        paintedId = atlas.GetSegmentation().AddEmptySegment("", "upper precentral")
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted, atlas, paintedId, atlasVolume)
        found = logic.process(volume, [paintedId])
        foundId = found.GetSegmentation().GetSegmentIdBySegmentName("upper precentral")
        self.assertGreater(slicer.util.arrayFromSegmentBinaryLabelmap(found, foundId, volume).sum(), 100)

        self.delayDisplay("Listing the missing labels and exporting the segments for training")
        import tempfile
        from LabelConditionedSegLib.training_folder import read_annotated
        table = logic.core.segmenter(BUNDLED_MODEL, "cpu").checkpoint.label_table
        done = picked + ["Thalamus_L"]
        self.assertEqual(len(logic.core.missingLabels(segmentation, BUNDLED_MODEL)), len(table) - len(done))
        with tempfile.TemporaryDirectory() as folder:
            logic.core.exportForTraining(volume, segmentation, folder, "MRHead", BUNDLED_MODEL)
            self.assertEqual(read_annotated(Path(folder), "MRHead", table), sorted(table.resolve(n).value for n in done))

        self.delayDisplay("Proposing a missing label, accepting it, and undoing that")
        proposals = logic.core.proposeMissing(volume, segmentation, BUNDLED_MODEL, labels=["Hippocampus_R"])
        logic.core.acceptProposal(proposals, proposals.GetSegmentation().GetNthSegmentID(0), segmentation)
        self.assertEqual(segments.GetNthSegment(segments.GetNumberOfSegments() - 1).GetName(), "Hippocampus_R")
        self.assertTrue(logic.core.canUndo())
        logic.core.undoLastRun()
        self.assertEqual(segments.GetSegmentIdBySegmentName("Hippocampus_R"), "")

        self.delayDisplay("A cancelled run leaves the scene as it was")
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(Cancelled):
            logic.process(volume, picked, cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")
