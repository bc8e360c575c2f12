"""Draw docs/panel.png from the module's real .ui file, outside Slicer.

Slicer's own widgets (ctk*, qMRML*) are swapped for the closest plain Qt widgets and the
panel is filled with the bundled model's labels, so README can show what users will see.
Needs PySide6 next to the project's environment:  pip install PySide6-Essentials
    QT_QPA_PLATFORM=offscreen python docs/draw_panel.py
"""
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from PySide6.QtCore import QBuffer, QByteArray, QIODevice
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QLabel, QListWidgetItem, QWidget

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "LabelConditionedSeg")]
from LabelConditionedSegLib.checkpoint import BUNDLED, Checkpoint  # noqa: E402

STAND_INS = {"ctkCollapsibleButton": "QGroupBox", "qMRMLWidget": "QWidget", "qMRMLNodeComboBox": "QComboBox",
             "ctkPathLineEdit": "QLineEdit", "ctkSearchBox": "QLineEdit", "ctkSliderWidget": "QDoubleSpinBox"}


def plain_ui() -> QByteArray:
    tree = ET.parse(ROOT / "Resources" / "UI" / "LabelConditionedSeg.ui")
    for widget in tree.iter("widget"):
        widget.set("class", STAND_INS.get(widget.get("class"), widget.get("class")))
        for prop in list(widget.findall("property")):
            if prop.get("name") in ("text",) and widget.get("class") == "QGroupBox":
                prop.set("name", "title")
            if prop.get("name") in ("nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled",
                                    "noneDisplay", "renameEnabled", "filters", "nameFilters", "collapsed"):
                widget.remove(prop)
    root = tree.getroot()
    for tag in ("customwidgets", "connections"):
        if root.find(tag) is not None:
            root.remove(root.find(tag))
    return QByteArray(ET.tostring(root))


def add_item(widget, text: str, color, selected: bool) -> None:
    """A list entry with a color swatch, as the module's widget draws it."""
    item = QListWidgetItem(text)
    pixmap = QPixmap(14, 14)
    pixmap.fill(QColor(*color))
    item.setIcon(QIcon(pixmap))
    widget.addItem(item)
    item.setSelected(selected)


def main(out: Path) -> None:
    app = QApplication([])
    buffer = QBuffer()
    buffer.setData(plain_ui())
    buffer.open(QIODevice.ReadOnly)
    panel: QWidget = QUiLoader().load(buffer)
    find = lambda name, cls=QWidget: panel.findChild(cls, name)  # noqa: E731
    checkpoint = Checkpoint.load(BUNDLED)
    find("inputVolumeSelector", QComboBox).addItem("MRHead")
    find("outputSegmentationSelector", QComboBox).addItem("Create new segmentation")
    find("checkpointPathLineEdit").setText("bundled")
    find("checkpointInfoLabel", QLabel).setText(checkpoint.description)
    for cls, name, items in [(QComboBox, "deviceComboBox", ["auto", "cuda", "cpu"]),
                             (QComboBox, "registrationComboBox", ["affine", "deformable", "rigid", "none"])]:
        find(name, cls).addItems(items)
    find("deviceInfoLabel", QLabel).setText("No CUDA GPU found: LCS runs on the CPU.")
    find("thresholdSliderWidget").setValue(0.5)
    table = list(checkpoint.label_table)
    labels = find("labelListWidget")
    for label in table[:12]:
        add_item(labels, label.name, label.color, label.name in ("Precentral_L", "Frontal_Sup_R", "Frontal_Mid_L"))
    labels.addItem(QListWidgetItem("upper precentral (painted)"))
    find("relabelSegmentationSelector", QComboBox).addItem("MRHead partial")
    find("missingLabelsLabel", QLabel).setText(f"3 of {len(table)} atlas labels missing from MRHead partial:")
    find("proposalSegmentationSelector", QComboBox).addItem("MRHead partial proposals")
    for i, label in enumerate(checkpoint.label_table.resolve(n) for n in ("Hippocampus_L", "Amygdala_L", "Caudate_L")):
        add_item(find("missingLabelListWidget"), label.name, label.color, True)
        add_item(find("proposalListWidget"), f"{label.name}   uncertainty {0.041 + 0.013 * i:.3f}", label.color, i == 0)
    find("proposalPassesSpinBox").setValue(8)
    find("exportFolderPathLineEdit").setText("~/lcs-training")
    find("caseNameLineEdit").setText("subject07")
    find("exportSegmentationSelector", QComboBox).addItem("MRHead partial")
    find("bundledModelButton").setEnabled(False)  # the bundled model is the one chosen
    # During a run, as LabelConditionedSegWidget.runInBackground leaves the buttons: Apply reads Cancel, and
    # Propose and Undo are off until the run ends; Accept, Reject and Export keep their state.
    for name in ("acceptProposalButton", "rejectProposalButton", "exportButton"):
        find(name).setEnabled(True)
    for name in ("proposeButton", "undoButton"):
        find(name).setEnabled(False)
    find("applyButton").setEnabled(True)
    find("applyButton").setText("Cancel")
    find("progressBar").setValue(42)
    find("statusLabel", QLabel).setText("decoded 1 of 3 labels")
    for box in panel.findChildren(QGroupBox):
        box.setVisible(True)
    panel.resize(420, 1300)
    panel.grab().save(str(out))
    app.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ROOT / "docs" / "panel.png")
