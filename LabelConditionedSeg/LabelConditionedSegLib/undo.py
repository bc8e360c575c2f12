"""The undo record: what the last Apply, proposal run, accept or reject did to the scene, to take it back.

Slicer keeps scene undo off, so the logic keeps its own record of the last change (one level). Only node IDs and
segments are held, never nodes, so deleted nodes are not kept alive.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .errors import LCSError
from .mrml import GEOMETRY


def few(names: Sequence[str], shown: int = 3) -> str:
    """A short list for a one-line message."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@dataclass
class Change:
    """What one Apply, proposal run, accept or reject did to the scene, so that `undo` can take it back: the nodes it
    created, the segments it added, the segments it removed (held here, off the scene) and the state of a
    segmentation it re-placed."""

    description: str
    created: list[str] = field(default_factory=list)  # node IDs
    added: list[tuple[str, str]] = field(default_factory=list)  # (segmentation node ID, segment ID)
    removed: list[tuple[str, int, str, object]] = field(default_factory=list)  # (node ID, index, ID, vtkSegment)
    states: list[tuple] = field(default_factory=list)  # (node ID, transform ID, reference geometry, reference ID)

    def __bool__(self) -> bool:
        return bool(self.created or self.added or self.removed or self.states)

    def nodeIds(self) -> set[str]:
        return {*self.created, *(a[0] for a in self.added), *(r[0] for r in self.removed), *(s[0] for s in self.states)}

    def keep_state(self, segmentation) -> None:
        """An existing segmentation's transform and reference geometry, put back on undo."""
        self.states.append((segmentation.GetID(), segmentation.GetTransformNodeID(),
                            segmentation.GetSegmentation().GetConversionParameter(GEOMETRY),
                            segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole())))

    def take(self, segmentation, segmentId: str):
        """Remove a segment from `segmentation`, holding it (with its own voxels) to put back on undo."""
        segments = segmentation.GetSegmentation()
        segment = segments.GetSegment(segmentId)
        self.removed.append((segmentation.GetID(), segments.GetSegmentIndex(segmentId), segmentId, segment))
        segments.RemoveSegment(segmentId)  # one sharing a layer gets its own voxels first (SeparateSegmentLabelmap)
        return segment

    def undo(self, scene) -> list[str]:
        """Take the change back as far as its nodes are still in the scene. A segmentation it created that holds
        segments added since (the user's) stays, without the change's segments; returns the names of those."""
        for nodeId, segmentId in self.added:
            node = scene.GetNodeByID(nodeId)
            if node is not None and node.GetSegmentation().GetSegment(segmentId) is not None:
                node.GetSegmentation().RemoveSegment(segmentId)
        for nodeId, index, segmentId, segment in reversed(self.removed):
            node = scene.GetNodeByID(nodeId)
            if node is not None:
                segments = node.GetSegmentation()
                before = segments.GetNthSegmentID(index) if index < segments.GetNumberOfSegments() else ""
                segments.AddSegment(segment, segments.GenerateUniqueSegmentID(segmentId), before)
        for nodeId, transformId, geometry, referenceId in self.states:
            node = scene.GetNodeByID(nodeId)
            if node is not None:
                node.SetAndObserveTransformNodeID(transformId)
                node.GetSegmentation().SetConversionParameter(GEOMETRY, geometry)
                node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), referenceId)
        kept = []
        for nodeId in reversed(self.created):
            node = scene.GetNodeByID(nodeId)
            segmentation = node is not None and node.IsA("vtkMRMLSegmentationNode")
            if segmentation and node.GetSegmentation().GetNumberOfSegments():  # left: the user's (the run's went above)
                kept.append(node.GetName())
            elif node is not None:
                displayed = node.IsA("vtkMRMLDisplayableNode")  # a batch's table node is not
                helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes() if displayed else 0)]
                helpers.append(node.GetStorageNode())
                scene.RemoveNode(node)
                for helper in helpers:  # Slicer may have removed them with the node
                    if helper is not None and scene.IsNodePresent(helper):
                        scene.RemoveNode(helper)
        return kept


class UndoRecord:
    """The last change (one level), and the undo group that changes made meanwhile join."""

    def __init__(self, scene):
        self.scene = scene
        self._last: Change | None = None
        self._group: Change | None = None

    def clear(self) -> None:
        self._last = None

    def canUndo(self) -> bool:
        """Whether `undo` has something to take back (a node of the last change is still in the scene)."""
        return self._last is not None and any(self.scene.GetNodeByID(i) is not None for i in self._last.nodeIds())

    def undo(self) -> str:
        """Take back the last change as far as its nodes are still in the scene; one line saying what was undone."""
        change, self._last = self._last, None
        if change is None or not any(self.scene.GetNodeByID(i) is not None for i in change.nodeIds()):
            raise LCSError("there is nothing to undo: the last run, accept or reject was undone already, or its "
                           "nodes were deleted")
        kept = change.undo(self.scene)
        return f"Undid {change.description}." + (f" Kept {few(kept)}: it holds segments added since." if kept else "")

    @contextmanager
    def group(self, description: str) -> Iterator[None]:
        """Record everything done inside as one undo step (e.g. accepting several proposals at once)."""
        self._group = Change(description)
        try:
            yield
        finally:
            group, self._group = self._group, None
            if group:
                self._last = group

    @contextmanager
    def recording(self, description: str) -> Iterator[Change]:
        """A change to fill in; it becomes the undo step (also when an error stops it half-way), or joins the
        open group."""
        change = self._group if self._group is not None else Change(description)
        try:
            yield change
        finally:
            if change is not self._group and change:
                self._last = change
