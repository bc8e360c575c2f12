"""Static checks of the Slicer module: what Qt cannot run here, read from the files themselves.

- the CMake files list every Python file and resource the module needs;
- the .ui holds every widget the module file uses, with the right class, and one widget of a
  fitting class for every parameter-node field;
- the module loads in a Slicer without PyTorch (torch is imported only after the install offer).
"""
import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LabelConditionedSeg"
MODULE_FILE = MODULE / "LabelConditionedSeg.py"
UI_FILE = ROOT / "Resources" / "UI" / "LabelConditionedSeg.ui"

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
}


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", "LabelConditionedSeg") for item in match.group(1).split()]


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    shipped = sorted(str(p.relative_to(ROOT / "Resources")) for p in (ROOT / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == shipped
    used = re.findall(r'resource\("([^"]+)"\)', MODULE_FILE.read_text())
    assert used and set(used) <= set(resources)
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_cmake_declares_the_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    for needed in ('EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_DEPENDS "PyTorch"', "add_subdirectory(LabelConditionedSeg)",
                   "find_package(Slicer REQUIRED)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text
    icon = re.search(r'EXTENSION_ICONURL ".*/main/(.+?)"', text).group(1)
    assert (ROOT / icon).is_file()


def ui_widgets() -> dict[str, ET.Element]:
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}


def parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.find("string").text
    return None


def test_every_widget_the_module_uses_exists_with_its_class():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
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
    tree = ast.parse(MODULE_FILE.read_text())
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
    tree = ast.parse(MODULE_FILE.read_text())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"threading", "time", "traceback", "pathlib", "typing", "qt", "slicer", "vtk"}, imported


@pytest.mark.parametrize("name", ["Icons/LabelConditionedSeg.png", "UI/LabelConditionedSeg.ui", "Models/demo.lcs"])
def test_resources_are_real_files(name):
    data = (ROOT / "Resources" / name).read_bytes()
    magic = {".png": b"\x89PNG", ".ui": b"<?xml", ".lcs": b"PK"}[Path(name).suffix]
    assert data.startswith(magic)
