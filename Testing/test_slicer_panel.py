"""Issue 27's panel faults that live in Qt (3, 6, 11, 12, 14) and its packaging fault (13), checked statically: no
Qt runs here, so the .ui, the module file and the CMake files are read as they are. Each check names the Slicer or
CTK behaviour (5.6 to 5.10, CTK at the commit each pins) that made the fault."""
import ast
import re
import xml.etree.ElementTree as ET

from test_slicer_module import (MODULE, MODULE_FILE, ROOT, UI_FILE, calls, cmake_list, cmake_value, method,
                                module_tree, parameter_name, ui_widgets)


def widget_property(name: str, prop: str):
    element = [p for p in ui_widgets()[name].findall("property") if p.get("name") == prop][0]
    return [s.text for s in element.iter("string")] or [e.text for e in element]


def source(name: str, cls: str = "LabelConditionedSegWidget") -> str:
    return ast.unparse(method(cls, name))


def test_3_the_bundled_model_has_its_own_control():
    """ctkPathLineEdit emits currentPathChanged only for text its name-filter validator accepts
    (ctkPathLineEdit::updateHasValidInput), so "bundled" or an empty field never reached the parameter node."""
    assert widget_property("checkpointPathLineEdit", "nameFilters") == ["LCS checkpoints (*.lcs)"]  # the cause stays
    assert ui_widgets()["bundledModelButton"].get("class") == "QPushButton"
    assert "self.ui.bundledModelButton.clicked.connect(self.onUseBundledModel)" in source("setup")
    assert "self._parameterNode.checkpointPath = Path(BUNDLED_MODEL)" in source("onUseBundledModel")
    assert "self.ui.bundledModelButton.enabled = checkpoint != BUNDLED_MODEL" in source("refreshLabels")


def test_6_export_has_its_own_segmentation_and_asks_before_an_unlabelled_case():
    selector = ui_widgets()["exportSegmentationSelector"]
    assert parameter_name(selector) == "exportSegmentation"
    assert widget_property("exportSegmentationSelector", "noneEnabled") == ["true"]
    connected = {c.find("receiver").text for c in ET.parse(UI_FILE).iter("connection")}
    assert "exportSegmentationSelector" in connected  # gets the scene, as the other selectors do
    export = source("onExport")
    assert "relabelSegmentation" not in export
    assert "core.exportForTraining(p.inputVolume, segmentation," in export and "segmentation = p.exportSegmentation" in export
    (ask,) = [n for n in ast.walk(method("LabelConditionedSegWidget", "onExport")) if isinstance(n, ast.If)
              and calls(n.test, "confirmOkCancelDisplay") and "GetNumberOfSegments" in ast.unparse(n.test)]
    assert isinstance(ask.body[0], ast.Return)
    assert "p.exportSegmentation = p.outputSegmentation" in source("finishSegmentation")  # the default: the last output


def test_11_painting_keeps_atlas_labels_restores_the_views_and_atlas_nodes_stay_out_of_the_selectors():
    """Segment Editor's node starts with OverwriteAllSegments (vtkMRMLSegmentEditorNode.h): a brush stroke on the new
    region erased the atlas labels under it. The views showed the atlas after painting; the input selector (no None
    entry) picked the atlas image added to an empty scene."""
    paint = source("onPaintLabel")
    assert "editorNode.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)" in paint
    assert paint.index("editorNode.GetOverwriteMode()") < paint.index("SetOverwriteMode")  # saved before
    assert paint.index("GetBackgroundVolumeID()") < paint.index("setSliceViewerLayers")
    end = source("endPaintSession")
    assert "editorNode.SetOverwriteMode(overwriteMode)" in end and "view.SetBackgroundVolumeID(volumeId)" in end
    assert calls(method("LabelConditionedSegWidget", "enter"), "endPaintSession")
    keep = source("keepAtlasNodesOut")
    assert "selector.sortFilterProxyModel().setHiddenNodeIDs(ids)" in keep
    assert "p.inputVolume = core.defaultInputVolume()" in keep
    selectors = [w for w, e in ui_widgets().items() if e.get("class") == "qMRMLNodeComboBox"]
    own = [s for s in selectors if s != "proposalSegmentationSelector"]  # proposals are never atlas nodes either way
    assert all(f"self.ui.{s}" in keep for s in own), own
    for name in ("refreshPanel", "onPaintLabel", "onSceneEndImport"):
        assert calls(method("LabelConditionedSegWidget", name), "keepAtlasNodesOut")
    assert "self.logic.core.defaultInputVolume()" in source("initializeParameterNode")


def test_12_the_second_click_of_a_double_click_neither_cancels_nor_reruns():
    """A QPushButton emits clicked for each click of a double click: the run started and was cancelled at once."""
    run = method("LabelConditionedSegWidget", "runInBackground")
    first = run.body[1]  # after the docstring, before the Cancel branch and the start
    assert isinstance(first, ast.If) and isinstance(first.body[0], ast.Return)
    assert ast.unparse(first.test) == "time.time() - self._started < qt.QApplication.doubleClickInterval() / 1000"
    assert "self._worker is not None" in ast.unparse(run.body[2].test)
    assert run.body.index(first) < [i for i, n in enumerate(run.body) if "self._started" in ast.unparse(n)
                                     and isinstance(n, ast.Assign)][0]


def test_13_the_atlas_notice_ships_and_the_extension_names_its_own_licence():
    notice = (ROOT / "Resources" / "Models" / "NOTICE.txt").read_text(encoding="utf-8")
    assert "Copyright 2006-2010, Chris Rorden" in notice and "Redistributions in binary form must reproduce" in notice
    assert "Models/NOTICE.txt" in cmake_list((MODULE / "CMakeLists.txt").read_text(encoding="utf-8"), "MODULE_PYTHON_RESOURCES")
    assert '"NOTICE.txt"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # the wheel carries the demo model too
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    # UseSlicer.cmake gives an extension Slicer's own licence file when EXTENSION_LICENSE_FILE is unset
    assert "set(EXTENSION_LICENSE_FILE ${CMAKE_CURRENT_SOURCE_DIR}/LICENSE)" in text
    assert text.index("EXTENSION_LICENSE_FILE") < text.index("include(${Slicer_USE_FILE})")
    assert "maintainers" not in cmake_value("EXTENSION_CONTRIBUTORS")


def test_13_the_panel_picture_shows_a_state_the_code_reaches():
    """docs/panel.png showed Undo enabled during a run; runInBackground turns off every run button but the one running."""
    run = source("runInBackground")
    turned_off = re.search(r"for other in \((.*?)\):", run, re.S).group(1)
    assert {"self.ui.applyButton", "self.ui.proposeButton", "self.ui.undoButton"} <= set(re.split(r",\s*", turned_off))
    draw = (ROOT / "docs" / "draw_panel.py").read_text(encoding="utf-8")
    assert re.search(r'for name in \("proposeButton", "undoButton"\):\n\s+find\(name\)\.setEnabled\(False\)', draw)
    assert 'find("applyButton").setText("Cancel")' in draw


def test_14_the_installed_torch_version_is_checked_before_torch_is_imported():
    problem = ast.unparse([n for n in module_tree().body if isinstance(n, ast.FunctionDef) and n.name == "torchProblem"][0])
    assert "installed_torch_problem()" in problem
    assert problem.index("installed_torch_problem()") < problem.index("import torch")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Intel" in readme[readme.index("**Which PyTorch.**"):readme.index("## Command line")]
    assert "2.2.2" in readme[readme.index("## In 3D Slicer"):readme.index("### Picking labels")]
