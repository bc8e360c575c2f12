"""Static checks of the Slicer module: what Qt cannot run here, read from the files themselves.

- the CMake files list every Python file and resource the module needs;
- the .ui holds every widget the module file uses, with the right class, and one widget of a
  fitting class for every parameter-node field;
- the module loads in a Slicer without PyTorch (torch is imported only after the install offer);
- what Slicer 5.6 to 5.10 do with the calls the widget makes (parameter-node binding, error display);
- the extension's metadata, licence and Extensions Index entry agree with each other and with the repository.
"""
import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LabelConditionedSeg"
MODULE_FILE = MODULE / "LabelConditionedSeg.py"
UI_FILE = ROOT / "Resources" / "UI" / "LabelConditionedSeg.ui"
LOGIC_FILE = MODULE / "LabelConditionedSegLib" / "logic.py"
SEGMENTERS_FILE = MODULE / "LabelConditionedSegLib" / "segmenters.py"  # where the logic names the bundled model

# The class each widget that the module file touches must have in the .ui.
EXPECTED_WIDGETS = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "checkpointPathLineEdit": "ctkPathLineEdit",
    "checkpointInfoLabel": "QLabel",
    "labelFilterLineEdit": "ctkSearchBox",
    "labelListWidget": "QListWidget",
    "selectAllButton": "QPushButton",
    "selectNoneButton": "QPushButton",
    "paintLabelButton": "QPushButton",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "replaceExistingCheckBox": "QCheckBox",
    "keepProbabilitiesCheckBox": "QCheckBox",
    "deviceComboBox": "QComboBox",
    "deviceInfoLabel": "QLabel",
    "registrationComboBox": "QComboBox",
    "thresholdSliderWidget": "ctkSliderWidget",
    "applyButton": "QPushButton",
    "undoButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "relabelSegmentationSelector": "qMRMLNodeComboBox",
    "missingLabelsLabel": "QLabel",
    "missingLabelListWidget": "QListWidget",
    "proposalPassesSpinBox": "QSpinBox",
    "keepUncertaintyCheckBox": "QCheckBox",
    "proposeButton": "QPushButton",
    "proposalSegmentationSelector": "qMRMLNodeComboBox",
    "proposalListWidget": "QListWidget",
    "acceptProposalButton": "QPushButton",
    "rejectProposalButton": "QPushButton",
    "exportFolderPathLineEdit": "ctkPathLineEdit",
    "caseNameLineEdit": "QLineEdit",
    "exportButton": "QPushButton",
    "checkWarningLabel": "QLabel",
    "showRegisteredAtlasButton": "QPushButton",
    "volumeTableWidget": "QTableWidget",
    "matchesLabel": "QLabel",
    "proposalInfoLabel": "QLabel",
}
EXPECTED_WIDGETS.update({"bundledModelButton": "QPushButton",  # issue 27, fault 3
                         "exportSegmentationSelector": "qMRMLNodeComboBox"})  # issue 27, fault 6
EXPECTED_WIDGETS.update({"batchSceneButton": "QPushButton", "batchFolderButton": "QPushButton",  # issue 28, item 4
                         "batchFolderPathLineEdit": "ctkPathLineEdit", "batchOutputPathLineEdit": "ctkPathLineEdit"})


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", "LabelConditionedSeg") for item in match.group(1).split()]


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    shipped = sorted(str(p.relative_to(ROOT / "Resources")) for p in (ROOT / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == shipped
    used = re.findall(r'resource\("([^"]+)"\)', MODULE_FILE.read_text(encoding="utf-8"))
    assert used and set(used) <= set(resources)
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def cmake_value(variable: str) -> str:
    match = re.search(rf'set\({variable} "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert match, f"{variable} is not set"
    return match.group(1)


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def module_constant(name: str) -> str:
    (value,) = [n.value.value for n in module_tree().body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == [name]]
    return value


def test_extension_cmake_declares_the_extension():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ('EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_DEPENDS "PyTorch"', "add_subdirectory(LabelConditionedSeg)",
                   "find_package(Slicer REQUIRED)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text


def test_icon_and_screenshots_are_files_of_the_repository_at_its_homepage():
    """The Extensions Index downloads them: raw files of the homepage's repository, PNG images that exist here."""
    homepage = cmake_value("EXTENSION_HOMEPAGE")
    assert homepage == module_constant("HOMEPAGE")  # the module's help links to it
    owner_repo = re.fullmatch(r"https://github\.com/([\w.-]+/Slicer[\w.-]+)", homepage).group(1)
    raw = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    urls = [cmake_value("EXTENSION_ICONURL"), *cmake_value("EXTENSION_SCREENSHOTURLS").split()]
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith(raw), url
        assert (ROOT / url[len(raw):]).read_bytes().startswith(b"\x89PNG"), url


def test_contributors_are_named_with_their_organization():
    """Slicer's form, "Name (Organization)", the same in the extension and the module."""
    (module,) = [n for n in ast.walk(module_tree()) if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "attr", None) == "contributors"]
    contributors = ast.literal_eval(module.value)
    assert contributors and ", ".join(contributors) == cmake_value("EXTENSION_CONTRIBUTORS")
    for contributor in contributors:
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor), contributor


def test_extensions_index_entry_matches_the_extension():
    """Written as ExtensionsIndex's PyTorch.json and TotalSegmentator.json are; its name is the project's (the index's
    check_cmakelists_content), its fields those of the catalog-entry schema v1.0.1, its repository the homepage."""
    project = re.search(r"project\((\w+)\)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")).group(1)
    path = ROOT / f"{project}.json"
    assert b"\r" not in path.read_bytes()  # the index refuses CR line endings
    entry = json.loads(path.read_text(encoding="utf-8"))
    assert {"$schema", "category", "scm_url"} <= set(entry) <= {
        "$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
        "enabled", "tier"}
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == cmake_value("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_value("EXTENSION_DEPENDS").split()
    assert entry["scm_url"] == cmake_value("EXTENSION_HOMEPAGE") + ".git"
    assert f"/{entry['scm_revision']}/" in cmake_value("EXTENSION_ICONURL")  # the branch the URLs read
    assert entry["tier"] in (1, 3, 5) and entry["build_subdirectory"] == "."


def test_licence_file_readme_and_pyproject_agree():
    """Apache-2.0 everywhere; the README also gives the bundled atlas data's terms (BSD-3-Clause, per Debian's
    copyright file of mricron-data), whose notice a redistribution must carry."""
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and "END OF TERMS AND CONDITIONS" in licence
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## License\n"):]
    for needed in ("Apache-2.0", "LICENSE", "mricron-data", "BSD-3-Clause", "Copyright 2006-2010, Chris Rorden",
                   "Redistributions in binary form must reproduce"):
        assert needed in section, needed


def ui_widgets() -> dict[str, ET.Element]:
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}


def parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.find("string").text
    return None


def test_every_widget_the_module_uses_exists_with_its_class():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used - set(EXPECTED_WIDGETS) == set(), "add the new widgets to EXPECTED_WIDGETS"
    widgets = ui_widgets()
    for name in used:
        assert name in widgets, f"{name} is missing from {UI_FILE.name}"
        assert widgets[name].get("class") == EXPECTED_WIDGETS[name], name
    custom = {c.find("class").text for c in ET.parse(UI_FILE).iter("customwidget")}
    for widget in widgets.values():
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in custom, f"{cls} is not declared in <customwidgets>"


def parameter_fields() -> dict[str, ast.expr]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)
              and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list)]
    return {n.target.id: n for n in cls.body if isinstance(n, ast.AnnAssign)}


def expected_widget(field: ast.AnnAssign) -> tuple[str, list[str]]:
    """The widget class Slicer's GUI connectors bind to this field's type, and its choices if any."""
    annotation = field.annotation
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        base, *validators = annotation.slice.elts
        kinds = {v.func.id: v for v in validators}
        if "Choice" in kinds:
            return "QComboBox", ast.literal_eval(kinds["Choice"].args[0])
        assert base.id in ("float", "int") and "WithinRange" in kinds
        return {"float": "ctkSliderWidget", "int": "QSpinBox"}[base.id], []
    name = annotation.id
    if name.startswith("vtkMRML"):
        return "qMRMLNodeComboBox", [name]
    return {"Path": "ctkPathLineEdit", "bool": "QCheckBox", "str": "QLineEdit", "int": "QSpinBox"}[name], []


def test_every_parameter_node_field_has_a_fitting_widget():
    fields = parameter_fields()
    bound = {parameter_name(w): w for w in ui_widgets().values() if parameter_name(w)}
    assert set(bound) == set(fields)
    for name, field in fields.items():
        cls, detail = expected_widget(field)
        assert bound[name].get("class") == cls, name
        if cls == "qMRMLNodeComboBox":
            node_types = [s.text for p in bound[name].findall("property") if p.get("name") == "nodeTypes"
                          for s in p.iter("string")]
            assert node_types == detail, name
        if cls == "QComboBox":
            assert ast.literal_eval(field.value) in detail, f"default of {name} is not one of its choices"


def test_the_module_loads_without_torch():
    """Only Slicer's own packages at import time: torch and the Lib come after the install offer."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"contextlib", "importlib", "sys", "threading", "time", "traceback", "pathlib", "typing", "qt",
                        "slicer", "vtk"}, imported


@pytest.mark.parametrize("name", ["Icons/LabelConditionedSeg.png", "UI/LabelConditionedSeg.ui", "Models/demo.lcs"])
def test_resources_are_real_files(name):
    data = (ROOT / "Resources" / name).read_bytes()
    magic = {".png": b"\x89PNG", ".ui": b"<?xml", ".lcs": b"PK"}[Path(name).suffix]
    assert data.startswith(magic)


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) == name]


def method(cls: str, name: str) -> ast.FunctionDef:
    (klass,) = [n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == cls]
    (function,) = [n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return function


def test_the_panel_is_bound_once_with_a_tag_that_unbinds_it():
    """connectGui returns no tag in Slicer 5.6 and 5.8 (Base/Python/slicer/parameterNodeWrapper/wrapper.py, fixed in
    5.10), so disconnectGui(None) left each binding in place; connectParametersToGui returns it in all three."""
    tree = module_tree()
    assert not calls(tree, "connectGui")
    (connect,) = calls(tree, "connectParametersToGui")
    disconnects = calls(tree, "disconnectGui")
    assert disconnects and all(ast.unparse(c.args[0]) == "self._parameterNodeGuiTag" for c in disconnects)
    for name in ("enter", "exit"):  # bound once per parameter node, not at every visit
        body = method("LabelConditionedSegWidget", name)
        assert not calls(body, "setParameterNode") and not calls(body, "connectParametersToGui")
    exit_ = method("LabelConditionedSegWidget", "exit")
    assert calls(exit_, "unfollowParameterNode") and calls(exit_, "stopObservingSegments")
    assert calls(method("LabelConditionedSegWidget", "unfollowParameterNode"), "removeObserver")


def test_one_parameter_node_wrapper_across_scene_closes():
    """The singleton parameter node outlives a scene close (test_slicer_logic_faults checks it in slicer-core), and each
    connectParametersToGui leaves an observer holding its wrapper on it (wrapper.py, 5.6 to 5.10): a close keeps the
    binding, and a new wrapper is made only for another node."""
    start_close = method("LabelConditionedSegWidget", "onSceneStartClose")
    assert not calls(start_close, "setParameterNode") and not calls(start_close, "disconnectGui")
    assert calls(start_close, "unfollowParameterNode")
    made = [c for c in ast.walk(module_tree()) if isinstance(c, ast.Call)
            and getattr(c.func, "id", None) == "LabelConditionedSegParameterNode"]
    init = method("LabelConditionedSegWidget", "initializeParameterNode")
    (guard,) = [n for n in ast.walk(init) if isinstance(n, ast.If) and calls(n, "LabelConditionedSegParameterNode")]
    assert len(made) == 1 and "self._parameterNode.parameterNode is not node" in ast.unparse(guard.test)


def test_errors_are_shown_once_and_what_follows_runs():
    """slicer.util.tryWithErrorDisplay re-raises after its message box (Base/Python/slicer/util.py, 5.6 to 5.10):
    the module uses its own showErrors, which does not."""
    tree = module_tree()
    assert "tryWithErrorDisplay" not in {getattr(n, "attr", None) for n in ast.walk(tree)}
    (show,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "showErrors"]
    (handler,) = [n for n in ast.walk(show) if isinstance(n, ast.ExceptHandler)]
    assert not [n for n in ast.walk(handler) if isinstance(n, ast.Raise)] and calls(handler, "errorDisplay")
    install = method("LabelConditionedSegWidget", "onInstallTorch")
    assert isinstance(install.body[-1], ast.Expr) and calls(install.body[-1], "refreshPanel")  # after OK and Cancel alike


def test_torch_is_installed_only_when_asked_and_never_in_a_test():
    """Slicer's confirmation prompts answer OK under --testing, and PyTorchUtils' own prompt is skipped there."""
    install = method("LabelConditionedSegLogic", "installTorch")
    first = install.body[1]  # after the docstring
    assert isinstance(first, ast.If) and "testingEnabled" in ast.unparse(first.test) and isinstance(first.body[0], ast.Raise)
    (call,) = calls(install, "installTorch")
    assert {k.arg: ast.unparse(k.value) for k in call.keywords}["askConfirmation"] == "False"
    test = method("LabelConditionedSegTest", "test_pick_paint_relabel_export_undo_and_cancel_on_MRHead")
    assert "torchProblem" in ast.unparse(test.body[0].test) and calls(test.body[0], "skipTest")


def test_the_bundled_model_is_stored_by_name():
    """The parameter node's default names the bundled model as the logic does, not by a path on this machine."""
    segmenters = ast.parse(SEGMENTERS_FILE.read_text(encoding="utf-8"))
    (value,) = [n.value.value for n in segmenters.body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == ["BUNDLED_MODEL"]]
    assert module_constant("BUNDLED_MODEL") == value
    assert ast.unparse(parameter_fields()["checkpointPath"].value) == "Path(BUNDLED_MODEL)"
    assert "demo.lcs" not in MODULE_FILE.read_text(encoding="utf-8")


def test_every_choice_of_registration_is_explained():
    field = parameter_fields()["registration"]
    choices = expected_widget(field)[1]
    assert choices[0] == ast.literal_eval(field.value) == "affine" and "deformable" in choices
    tooltip = [p.find("string").text for p in ui_widgets()["registrationComboBox"].findall("property")
               if p.get("name") == "toolTip"][0]
    assert all(f"{c}:" in tooltip or f"{c}." in tooltip for c in choices), tooltip
    assert "affine, then a fast non-linear registration of the atlas to the scan (a few seconds more; " \
           "needs a model trained for it)" in tooltip


def test_the_widget_calls_only_what_the_logic_has():
    """Every SegmentationLogic member the module uses (through `core`) is defined in logic.py."""
    logic = ast.parse(LOGIC_FILE.read_text(encoding="utf-8"))
    (cls,) = [n for n in logic.body if isinstance(n, ast.ClassDef) and n.name == "SegmentationLogic"]
    members = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    members |= {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"}
    used = {n.attr for n in ast.walk(module_tree()) if isinstance(n, ast.Attribute)
            and ast.unparse(n.value) in ("core", "self.core", "self._core", "self.logic.core", "logic.core")}
    assert {"undoLastRun", "canUndo", "observeSegments", "stopObservingSegments", "cleanup", "checkpointReference"} <= used
    assert used <= members, f"not in SegmentationLogic: {sorted(used - members)}"


def test_reload_reloads_the_lib():
    """Slicer's Reload re-reads the module file only (slicer.util.reloadScriptedModule, 5.6 to 5.10)."""
    reload = method("LabelConditionedSegWidget", "onReload")
    assert "LabelConditionedSegLib" in ast.unparse(reload) and "sys.modules" in ast.unparse(reload)
    assert ast.unparse(reload.body[-1]) == "ScriptedLoadableModuleWidget.onReload(self)"
    assert (MODULE / "LabelConditionedSegLib").is_dir()


def test_the_module_imports_only_what_the_lib_defines():
    """Each `from LabelConditionedSegLib.X import name` in the module (made after PyTorch loads) names a top-level
    definition of X."""
    imports = [n for n in ast.walk(module_tree()) if isinstance(n, ast.ImportFrom)
               and (n.module or "").startswith("LabelConditionedSegLib.")]
    assert imports
    for node in imports:
        source = ast.parse((MODULE / (node.module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        defined = {n.name for n in source.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in source.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        defined |= {a.asname or a.name for n in source.body if isinstance(n, ast.ImportFrom) for a in n.names}
        for alias in node.names:
            assert alias.name in defined, f"{node.module} has no {alias.name}"


def test_the_batch_section_holds_its_widgets_and_runs_as_one_background_job():
    """Issue 28, item 4: a collapsible Batch section of its own; both batches go through runInBackground (worker
    thread, progress, Cancel), which turns every other job button off meanwhile, and a Cancel keeps what a batch
    finished (onJobDone writes a batch when cancelled)."""
    sections = {w.get("name"): w for w in ET.parse(UI_FILE).iter("widget") if w.get("class") == "ctkCollapsibleButton"}
    inside = {w.get("name") for w in sections["batchCollapsibleButton"].iter("widget")}
    assert {"batchSceneButton", "batchFolderButton", "batchFolderPathLineEdit", "batchOutputPathLineEdit"} <= inside
    assert list(sections)[-1] == "batchCollapsibleButton"  # added after the others, none moved
    for name, button in [("onBatchScene", "batchSceneButton"), ("onBatchFolder", "batchFolderButton")]:
        (run,) = calls(method("LabelConditionedSegWidget", name), "runInBackground")
        assert ast.unparse(run.args[0]) == f"self.ui.{button}" and ast.unparse(run.args[2]) == "self.finishBatch"
    others = [n for n in ast.walk(method("LabelConditionedSegWidget", "runInBackground")) if isinstance(n, ast.For)]
    assert {"self.ui.batchSceneButton", "self.ui.batchFolderButton"} <= {ast.unparse(e) for e in others[0].iter.elts}
    assert "outcomes" in ast.unparse(method("LabelConditionedSegWidget", "onJobDone"))
