"""Matching a user's segments to atlas labels: names as radiologists type them, and terminology codes."""
import dataclasses

from LabelConditionedSegLib.checkpoint import BUNDLED, Checkpoint
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.matching import match_segments

AAL = Checkpoint.load(BUNDLED).label_table  # the bundled model's 116 AAL labels
ENTRY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~{}~{}"
         "~Anatomic codes - DICOM master list~^^~^^")  # a Slicer terminology entry


def matched(*names, table=AAL, entries=None) -> dict:
    segments = [(f"s{i}", name, (entries or {}).get(name, "")) for i, name in enumerate(names)]
    return {m.segmentName: (m.label, m.how) for m in match_segments(segments, table)}


def test_names_as_users_type_them_find_their_aal_label():
    assert matched("Left hippocampus", "hippocampus-R", "PRECUNEUS_L", "LeftAmygdala", "Right Amygdala",
                   "superior frontal gyrus, left", "Middle temporal R", "cerebellum 6 left", "thalamus lh") == {
        "Left hippocampus": ("Hippocampus_L", "similar name"),
        "hippocampus-R": ("Hippocampus_R", "similar name"),
        "PRECUNEUS_L": ("Precuneus_L", "name"),  # the same name in another case: no confirmation needed
        "LeftAmygdala": ("Amygdala_L", "similar name"),
        "Right Amygdala": ("Amygdala_R", "similar name"),
        "superior frontal gyrus, left": ("Frontal_Sup_L", "similar name"),
        "Middle temporal R": ("Temporal_Mid_R", "similar name"),
        "cerebellum 6 left": ("Cerebelum_6_L", "similar name"),  # AAL's spelling
        "thalamus lh": ("Thalamus_L", "similar name")}


def test_names_that_are_no_label_or_could_be_two_match_nothing():
    # no side where AAL has two; another organ; a side alone; a tumour; a word too many
    assert matched("Hippocampus", "Liver", "Left", "my tumour", "Left hippocampus tail") == {}


def test_terminology_codes_match_whatever_the_segment_is_named():
    code = "SCT^5976008^Hippocampus"
    table = LabelTable([dataclasses.replace(l, code=code if l.name.startswith("Hippocampus_") else "") for l in AAL])
    entries = {"Segment_1": ENTRY.format(code, "SCT^7771000^Left"), "Segment_2": ENTRY.format(code, "SCT^24028007^Right"),
               "Segment_3": ENTRY.format(code, "^^"), "Segment_4": ENTRY.format("SCT^85756007^Tissue", "^^")}
    assert matched("Segment_1", "Segment_2", "Segment_3", "Segment_4", table=table, entries=entries) == {
        "Segment_1": ("Hippocampus_L", "code"),  # the code's side modifier tells left from right
        "Segment_2": ("Hippocampus_R", "code")}  # no side (Segment_3), Slicer's default "Tissue": no label


def test_a_label_code_with_its_own_modifier_needs_that_modifier():
    table = LabelTable([dataclasses.replace(l, code=ENTRY.format("SCT^5976008^Hippocampus", "SCT^7771000^Left")
                                            if l.name == "Hippocampus_L" else "") for l in AAL])
    entries = {"a": ENTRY.format("SCT^5976008^Hippocampus", "SCT^7771000^Left"),
               "b": ENTRY.format("SCT^5976008^Hippocampus", "SCT^24028007^Right")}
    assert matched("a", "b", table=table, entries=entries) == {"a": ("Hippocampus_L", "code")}
