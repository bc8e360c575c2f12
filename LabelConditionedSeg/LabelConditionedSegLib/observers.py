"""Observers of segment lists, so that the panel's lists follow them. Only node IDs are kept, so an observed node
that is deleted is not kept alive."""
from __future__ import annotations

import weakref
from typing import Callable

import slicer

# Segment list changes; not Source/RepresentationModified, which fire on every paint stroke.
SEGMENT_EVENTS = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified)


class WeakCallback:
    """A bound method as an observer callback that does not keep its object alive: a logic nobody holds any more is
    freed instead of being called, half torn down, when its scene goes. A class with slots, not a closure: a scene
    freed in the middle of a garbage collection still calls its observers, and a closure the collector has cleared
    by then crashes the interpreter when called, where a cleared slot only reads as missing."""

    __slots__ = ("_target", "_name", "CallDataType")  # CallDataType: what vtk.calldata_type set on the method

    def __init__(self, method: Callable):
        self._target, self._name = weakref.ref(method.__self__), method.__name__
        if hasattr(method, "CallDataType"):
            self.CallDataType = method.CallDataType

    def __call__(self, *args) -> None:
        target = getattr(self, "_target", lambda: None)()
        if target is not None:
            getattr(target, self._name)(*args)


class SegmentObservers:
    """Callbacks on segment list changes, per segmentation node."""

    def __init__(self, scene):
        self.scene = scene
        self._observed: dict[str, list[tuple[Callable, list[int]]]] = {}  # node ID -> (callback, observer tags)

    def observe(self, segmentationNode, callback: Callable[[object], None]) -> None:
        """Call `callback(segmentationNode)` when one of its segments is added, removed, renamed, recoloured or
        retagged; observing the same node with the same callback again does nothing."""
        watched = self._observed.setdefault(segmentationNode.GetID(), [])
        if any(known == callback for known, _ in watched):
            return
        changed = lambda caller, event: callback(caller)  # noqa: E731 -- the caller is the node
        watched.append((callback, [segmentationNode.AddObserver(event, changed) for event in SEGMENT_EVENTS]))

    def stop(self, segmentationNode=None) -> None:
        """Stop observing `segmentationNode` (every observed segmentation when None)."""
        ids = list(self._observed) if segmentationNode is None else [segmentationNode.GetID()]
        for nodeId in ids:
            self._unobserve(nodeId, segmentationNode or self.scene.GetNodeByID(nodeId))

    def removed(self, node) -> None:
        """A node left the scene: its observers go."""
        nodeId = node.GetID() if node is not None else None
        if nodeId in self._observed:
            self._unobserve(nodeId, node)

    def forget(self) -> None:
        """The scene was closed: its nodes were removed one by one (vtkMRMLScene::Clear), so were their observers."""
        self._observed.clear()

    def _unobserve(self, nodeId: str, node) -> None:
        for _, tags in self._observed.pop(nodeId, []):
            for tag in tags if node is not None else ():
                node.RemoveObserver(tag)
