"""3D Slicer module: segment any atlas label, or a region painted on the atlas, on the loaded volume;
propose the atlas labels a partial segmentation lacks, and export it as a training case.

Qt glue only. The MRML work is LabelConditionedSegLib.logic.SegmentationLogic (tested under pytest
with slicer-core); the Widget binds the panel to it and runs the computation in a worker thread.
"""
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


def resource(name: str) -> Path:
    """A file of Resources/: beside the module in a built extension, at the repository's top in a source tree."""
    candidates = [HERE / "Resources" / name, HERE.parent / "Resources" / name]
    return next((p for p in candidates if p.exists()), candidates[0])


BUNDLED_CHECKPOINT = resource("Models/demo.lcs")


class LabelConditionedSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "Label Conditioned Segmentation"
        parent.categories = ["Segmentation"]
        parent.dependencies = []
        parent.contributors = ["The LCS for Slicer developers"]
        parent.helpText = (
            "Pick atlas labels (or paint a new region on the atlas), press Apply, and get named, colored "
            "segments on the input volume. One network serves every label: it is conditioned on the atlas "
            "image and the chosen atlas label. 'Relabel missing organs' proposes the atlas labels a partial "
            "segmentation lacks, for you to accept or reject, and exports the scan and its segments as a training "
            "case. See the project's README for the command line and training.")
        parent.acknowledgementText = (
            "Method: Ma, Lee and Sabuncu, 'Label Conditioned Segmentation', MIDL 2022. Demo atlas: Colin27 "
            "with the AAL labels (Tzourio-Mazoyer et al. 2002), from Debian's mricron-data.")
        parent.icon = qt.QIcon(str(resource("Icons/LabelConditionedSeg.png")))


@parameterNodeWrapper
class LabelConditionedSegParameterNode:
    """What the panel shows; each field is bound to the .ui widget whose SlicerParameterName matches."""

    inputVolume: vtkMRMLScalarVolumeNode
    checkpointPath: Path = BUNDLED_CHECKPOINT
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    registration: Annotated[str, Choice(["affine", "rigid", "none"])] = "affine"
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    keepProbabilities: bool = False
    replaceExisting: bool = False
    relabelSegmentation: vtkMRMLSegmentationNode  # the user's partial segmentation
    proposalPasses: Annotated[int, WithinRange(1, 64)] = 8
    keepUncertainty: bool = False
    proposalSegmentation: vtkMRMLSegmentationNode  # the proposals under review
    caseName: str = ""


def torchInstalled() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def ensureTorch() -> None:
    """PyTorch comes from Slicer's PyTorch extension, and is installed only once the user agrees."""
    if torchInstalled():
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("PyTorch is missing: install the 'PyTorch' extension with the Extensions Manager, "
                           "restart Slicer and try again.") from None
    if not slicer.util.confirmOkCancelDisplay(
            "Label Conditioned Segmentation needs PyTorch, which is not installed yet.\n\n"
            "Install it now? The PyTorch extension picks a build that fits this computer's GPU (or the CPU). "
            "The download can take several minutes.", windowTitle="Install PyTorch"):
        raise RuntimeError("PyTorch is needed to segment; press Apply again to install it.")
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.4") is None:
        raise RuntimeError("PyTorch could not be installed; see the Python console, or use the PyTorch Utils module.")


class LabelConditionedSegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: makes sure PyTorch is there, then hands over to SegmentationLogic."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    @property
    def core(self):
        """LabelConditionedSegLib.logic.SegmentationLogic (imported once torch is available)."""
        if self._core is None:
            ensureTorch()
            from LabelConditionedSegLib.logic import SegmentationLogic
            self._core = SegmentationLogic(slicer.mrmlScene)
        return self._core

    def process(self, inputVolume, labels, outputSegmentation=None, checkpointPath=None, **options):
        """See SegmentationLogic.process; the bundled demo model is the default checkpoint."""
        return self.core.process(inputVolume, labels, outputSegmentation, checkpointPath or BUNDLED_CHECKPOINT, **options)

    @staticmethod
    def usableDevice(requested: str) -> tuple[str, str]:
        """The device to run on and a notice when it differs from the one asked for (no GPU: the CPU)."""
        import torch
        if requested == "cuda" and not torch.cuda.is_available():
            return "cpu", "No CUDA GPU is available here: running on the CPU."
        return requested, ""

    @staticmethod
    def describeDevices() -> str:
        if not torchInstalled():
            return "PyTorch is not installed yet; Apply offers to install it."
        import torch
        if torch.cuda.is_available():
            return f"CUDA available: {torch.cuda.get_device_name(0)}"
        return "No CUDA GPU found: LCS runs on the CPU."


class LabelConditionedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the logic; the computation runs in a worker thread polled by a QTimer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._job = None
        self._finishJob = None
        self._error = None
        self._started = 0.0
        self._progress = (0.0, "")
        self._notices = []
        self._cancel = threading.Event()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)

    # ---- set-up -------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource("UI/LabelConditionedSeg.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LabelConditionedSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.checkpointPathLineEdit.currentPathChanged.connect(lambda path: self.refreshLabels())
        self.ui.labelFilterLineEdit.textChanged.connect(self.filterLabels)
        self.ui.labelListWidget.itemSelectionChanged.connect(self.updateButtons)
        self.ui.selectAllButton.clicked.connect(lambda: self.selectVisibleLabels(True))
        self.ui.selectNoneButton.clicked.connect(lambda: self.selectVisibleLabels(False))
        self.ui.paintLabelButton.clicked.connect(self.onPaintLabel)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.proposeButton.clicked.connect(self.onProposeOrCancel)
        self.ui.proposalListWidget.itemSelectionChanged.connect(self.updateButtons)
        self.ui.acceptProposalButton.clicked.connect(lambda: self.onReview(accept=True))
        self.ui.rejectProposalButton.clicked.connect(lambda: self.onReview(accept=False))
        self.ui.exportFolderPathLineEdit.currentPathChanged.connect(self.updateButtons)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.deviceInfoLabel.text = self.logic.describeDevices()
        self.ui.progressBar.hide()
        self.initializeParameterNode()
        self.refreshLabels()

    def cleanup(self):
        self._cancel.set()
        self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self._cancel.set()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.refreshLabels()
        self.refreshRelabel()

    def initializeParameterNode(self):
        self.setParameterNode(LabelConditionedSegParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.refreshRelabel)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.refreshRelabel)
            self.refreshRelabel()

    # ---- the atlas label list ---------------------------------------------------------------
    def checkpointPath(self) -> str:
        path = self._parameterNode.checkpointPath if self._parameterNode else BUNDLED_CHECKPOINT
        return str(path or BUNDLED_CHECKPOINT)

    def refreshLabels(self, *unused):
        """Trained labels of the checkpoint, then regions painted on the atlas; keeps the selection."""
        widget = self.ui.labelListWidget
        selected = set(self.selectedLabels())
        widget.clear()
        if not torchInstalled():
            self.ui.checkpointInfoLabel.text = "PyTorch is not installed yet: press Apply to install it."
            self.updateButtons()
            return
        try:
            checkpoint = self.logic.core.segmenter(self.checkpointPath(), "cpu").checkpoint
        except Exception as error:
            self.ui.checkpointInfoLabel.text = f"Cannot use this model: {error}"
            self.updateButtons()
            return
        self.ui.checkpointInfoLabel.text = checkpoint.description
        entries = [(l.name, str(l.value), l.color) for l in checkpoint.label_table]
        painted = self.logic.core.atlasSegmentation
        for segmentId in self.logic.core.paintedSegmentIds(self.checkpointPath()):
            segment = painted.GetSegmentation().GetSegment(segmentId)
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
        """Atlas image and labels in the scene, a new segment on them, and Segment Editor opened on it."""
        with slicer.util.tryWithErrorDisplay("Could not open the atlas for painting.", waitCursor=True):
            atlas = self.logic.core.loadAtlas(self.checkpointPath())
            self.observeSegments(atlas, self.refreshLabels)
            segments = atlas.GetSegmentation()
            atlasVolume = atlas.GetNodeReference(atlas.GetReferenceImageGeometryReferenceRole())
            segmentId = segments.AddEmptySegment("", "New atlas region", [1.0, 0.85, 0.2])
            slicer.util.setSliceViewerLayers(background=atlasVolume, fit=True)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(atlas)
            setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode  # Slicer < 5.2
            setSource(atlasVolume)
            editor.setCurrentSegmentID(segmentId)
            editor.setActiveEffectByName("Paint")
            slicer.util.showStatusMessage("Paint the new region on the atlas, rename it, then come back and Apply.", 8000)

    def observeSegments(self, segmentation, callback):
        """Call `callback` whenever a segment of `segmentation` is added, removed or changed."""
        segments = segmentation.GetSegmentation()
        for event in (segments.SegmentAdded, segments.SegmentRemoved, segments.SegmentModified):
            if not self.hasObserver(segments, event, callback):
                self.addObserver(segments, event, callback)

    # ---- relabel missing organs -------------------------------------------------------------
    def refreshRelabel(self, *unused):
        """The labels missing from the chosen segmentation and the proposals under review; follows their segments."""
        p = self._parameterNode
        segmentation = p.relabelSegmentation if p else None
        proposals = p.proposalSegmentation if p else None
        for node in (segmentation, proposals):
            if node:
                self.observeSegments(node, self.refreshRelabel)
        picked, selected = set(self.pickedMissingLabels()), set(self.selectedProposals())
        self.ui.missingLabelListWidget.clear()
        self.ui.proposalListWidget.clear()
        if not segmentation or not torchInstalled():
            self.ui.missingLabelsLabel.text = ("Select the segmentation to complete (segments named like atlas labels)."
                                               if torchInstalled() else "PyTorch is not installed yet: press Apply.")
            self.updateButtons()
            return
        try:
            table = self.logic.core.segmenter(self.checkpointPath(), "cpu").checkpoint.label_table
            missing = self.logic.core.missingLabels(segmentation, self.checkpointPath())
        except Exception as error:
            self.ui.missingLabelsLabel.text = f"Cannot use this model: {error}"
            self.updateButtons()
            return
        self.ui.missingLabelsLabel.text = f"{len(missing)} of {len(table)} atlas labels missing from {segmentation.GetName()}:"
        for name in missing:
            addListItem(self.ui.missingLabelListWidget, name, name, table.resolve(name).color, name in picked)
        if proposals:
            segments = proposals.GetSegmentation()
            for segmentId, uncertainty in self.logic.core.listProposals(proposals):
                segment = segments.GetSegment(segmentId)
                text = segment.GetName() if uncertainty is None else f"{segment.GetName()}   uncertainty {uncertainty:.3f}"
                addListItem(self.ui.proposalListWidget, text, segmentId, [round(255 * c) for c in segment.GetColor()],
                            segmentId in selected)
        self.updateButtons()

    def pickedMissingLabels(self) -> list:
        return [item.data(qt.Qt.UserRole) for item in self.ui.missingLabelListWidget.selectedItems()]

    def selectedProposals(self) -> list:
        return [item.data(qt.Qt.UserRole) for item in self.ui.proposalListWidget.selectedItems()]

    def onReview(self, accept: bool):
        """Accept the selected proposals into the user's segmentation, or reject them; refusals are listed at the end."""
        p, core = self._parameterNode, self.logic.core
        refused = []
        for segmentId in self.selectedProposals():
            try:
                if accept:
                    core.acceptProposal(p.proposalSegmentation, segmentId, p.relabelSegmentation)
                else:
                    core.rejectProposal(p.proposalSegmentation, segmentId)
            except Exception as error:
                refused.append(str(error))
        self.refreshRelabel()
        if refused:
            slicer.util.errorDisplay("\n".join(refused), windowTitle="Some proposals were not accepted")

    def onExport(self):
        """Write the scan and the segmentation as a training case; asks before replacing a case of that name."""
        p, core = self._parameterNode, self.logic.core
        folder = self.ui.exportFolderPathLineEdit.currentPath  # read as text: an empty path must not become "."
        overwrite = bool(folder) and core.caseExists(folder, p.caseName)
        if overwrite and not slicer.util.confirmOkCancelDisplay(f"{folder} has a case {p.caseName!r} already. Replace it?"):
            return
        self._notices[:] = []
        core.messages = self._notices.append
        with slicer.util.tryWithErrorDisplay("Could not export the case for training.", waitCursor=True):
            core.exportForTraining(p.inputVolume, p.relabelSegmentation, folder, p.caseName, self.checkpointPath(), overwrite)
            self.ui.exportFolderPathLineEdit.addCurrentPathToHistory()
            self.ui.statusLabel.text = "  ".join([f"Exported case {p.caseName} to {folder}."] + self._notices)

    # ---- running ----------------------------------------------------------------------------
    def updateButtons(self, *unused):
        if self._worker is not None:
            return
        p = self._parameterNode
        if not torchInstalled():
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Install PyTorch", True
            for button in (self.ui.proposeButton, self.ui.acceptProposalButton, self.ui.rejectProposalButton,
                           self.ui.exportButton):
                button.enabled = False
            return
        ready = bool(p and p.inputVolume and self.selectedLabels())
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = "Segment the selected labels" if ready else "Select an input volume and atlas labels"
        partial = bool(p and p.inputVolume and p.relabelSegmentation)
        self.ui.proposeButton.text = "Propose missing labels"
        self.ui.proposeButton.enabled = partial and self.ui.missingLabelListWidget.count > 0
        reviewing = bool(p and p.proposalSegmentation and self.selectedProposals())
        self.ui.acceptProposalButton.enabled = reviewing and bool(p.relabelSegmentation)
        self.ui.rejectProposalButton.enabled = reviewing
        self.ui.exportButton.enabled = partial and bool(p.caseName) and bool(self.ui.exportFolderPathLineEdit.currentPath)

    def onApplyOrCancel(self):
        p = self._parameterNode
        self.runInBackground(self.ui.applyButton, lambda core, device: core.start(
            p.inputVolume, self.selectedLabels(), self.checkpointPath(), device, p.registration, p.threshold,
            p.keepProbabilities), self.finishSegmentation)

    def finishSegmentation(self, job) -> str:
        p = self._parameterNode
        p.outputSegmentation = self.logic.core.finish(job, p.outputSegmentation, p.replaceExisting)
        return f"Done: {len(job.conditions)} label(s)"

    def onProposeOrCancel(self):
        """Propose the missing labels selected in the list (all of them when none is selected)."""
        p = self._parameterNode
        picked = self.pickedMissingLabels()
        self.runInBackground(self.ui.proposeButton, lambda core, device: core.startProposals(
            p.inputVolume, p.relabelSegmentation, self.checkpointPath(), device, p.proposalPasses, p.registration,
            p.keepUncertainty, picked or None), self.finishProposals)

    def finishProposals(self, job) -> str:
        self._parameterNode.proposalSegmentation = self.logic.core.finishProposals(job)
        return f"Proposed {len(job.meanUncertainty)} of {len(job.conditions)} missing label(s); accept or reject them"

    def runInBackground(self, button, start, finish):
        """Start a job on the main thread (`start(core, device)`), compute it in a worker thread while `button`
        reads Cancel, then write its result with `finish(job)` on the main thread. Pressed again: cancel."""
        if self._worker is not None:
            self._cancel.set()
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not torchInstalled():
            with slicer.util.tryWithErrorDisplay("PyTorch is not available.", waitCursor=True):
                ensureTorch()
                self.ui.deviceInfoLabel.text = self.logic.describeDevices()
            self.refreshLabels()
            self.refreshRelabel()
            return
        try:
            device, notice = self.logic.usableDevice(self._parameterNode.device)
            core = self.logic.core
            core.messages = self._notices.append  # called from the worker; shown by _poll
            self._job = start(core, device)
        except Exception as error:
            slicer.util.errorDisplay(f"Cannot start: {error}", detailedText=traceback.format_exc())
            return
        self._notices[:] = [notice] if notice else []
        self._cancel.clear()
        self._error, self._progress, self._started = None, (0.0, "starting"), time.time()
        self._finishJob = finish
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()
        for other in (self.ui.applyButton, self.ui.proposeButton):
            other.enabled = other is button
        button.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._timer.start()

    def _work(self):
        """Worker thread: computation only, no Qt and no MRML calls."""
        try:
            self._job.run(self._report, self._cancel.is_set)
        except Exception as error:
            self._error = (error, traceback.format_exc())

    def _report(self, fraction: float, message: str):
        self._progress = (fraction, message)

    def _poll(self):
        """Main thread: show progress; when the worker is done, write the result into the scene."""
        fraction, message = self._progress
        self.ui.progressBar.value = int(100 * fraction)
        if not self._cancel.is_set():
            self.ui.statusLabel.text = "  ".join([message] + self._notices)
        if self._worker.is_alive():
            return
        self._timer.stop()
        self._worker, job, error, finish = None, self._job, self._error, self._finishJob
        self._job = self._finishJob = None
        self.ui.progressBar.hide()
        self.updateButtons()
        from LabelConditionedSegLib.errors import Cancelled
        if (error is not None and isinstance(error[0], Cancelled)) or self._cancel.is_set():
            self.ui.statusLabel.text = "Cancelled; the scene is as it was."
            return
        if error is not None:
            self.ui.statusLabel.text = f"Failed: {error[0]}"
            slicer.util.errorDisplay(f"The run failed: {error[0]}", detailedText=error[1])
            return
        with slicer.util.tryWithErrorDisplay("Could not add the result to the scene.", waitCursor=True):
            done = finish(job)
            seconds = time.time() - self._started
            self.ui.statusLabel.text = "  ".join([f"{done} in {seconds:.1f} s on {job.segmenter.device}."] + self._notices)
            self.ui.deviceInfoLabel.text = f"{self.logic.describeDevices()} Last run: {job.segmenter.device}."


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
    """Reload & Test: the whole flow on Slicer's MRHead sample with the bundled demo model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_pick_paint_relabel_export_and_cancel_on_MRHead()

    def test_pick_paint_relabel_export_and_cancel_on_MRHead(self):
        import numpy as np
        import SampleData
        from LabelConditionedSegLib.errors import Cancelled

        self.delayDisplay("Loading MRHead")
        volume = SampleData.downloadSample("MRHead")
        logic = LabelConditionedSegLogic()
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
        atlas = logic.core.loadAtlas(BUNDLED_CHECKPOINT)
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
        table = logic.core.segmenter(BUNDLED_CHECKPOINT, "cpu").checkpoint.label_table
        done = picked + ["Thalamus_L"]
        self.assertEqual(len(logic.core.missingLabels(segmentation, BUNDLED_CHECKPOINT)), len(table) - len(done))
        with tempfile.TemporaryDirectory() as folder:
            logic.core.exportForTraining(volume, segmentation, folder, "MRHead", BUNDLED_CHECKPOINT)
            self.assertEqual(read_annotated(Path(folder), "MRHead", table), sorted(table.resolve(n).value for n in done))

        self.delayDisplay("Proposing a missing label, accepting it")
        proposals = logic.core.proposeMissing(volume, segmentation, BUNDLED_CHECKPOINT, labels=["Hippocampus_R"])
        logic.core.acceptProposal(proposals, proposals.GetSegmentation().GetNthSegmentID(0), segmentation)
        self.assertEqual(segments.GetNthSegment(segments.GetNumberOfSegments() - 1).GetName(), "Hippocampus_R")

        self.delayDisplay("A cancelled run leaves the scene as it was")
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(Cancelled):
            logic.process(volume, picked, cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")
