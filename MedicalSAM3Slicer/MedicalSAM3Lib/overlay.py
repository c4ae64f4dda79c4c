"""Markers of the interactive prompts on the slice views: green positive and red negative points, the box
of each corrected slice, and the rubber band of a box being dragged (Qt-free: numpy and VTK).

The Segment Editor effect draws them as Slicer's own Draw and Paint effects draw their feedback: one
``vtkActor2D`` per slice view added with the effect's ``addActor2D`` (removed in ``deactivate``), its
``vtkPolyData`` in the view's XY (pixel) coordinates, recomputed from world positions with the inverse of
the slice node's ``XYToRAS`` whenever the slice moves. This module computes what to draw; the effect only
owns the actors.

Which prompts a view shows: those whose position lies within half a voxel of the view's plane (half the
voxel's thickness along the plane's normal), i.e. the points of the slice on screen; a box only in a view
whose plane holds all four of its corners (the view of the engine's slices). Prompts are kept in voxel
indices ``(z, y, x)`` (as the engine got them) and mapped to the world through the volume's geometry, so a
box is drawn as the engine sees it: a rectangle of the voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .interactive import Prompt, _to_numpy, volume_ijk_to_world, world_to_zyx, zyx_to_world

POSITIVE = (0.15, 0.85, 0.25)
NEGATIVE = (0.95, 0.2, 0.2)
BOX = (1.0, 0.8, 0.1)
RUBBER_BAND = (1.0, 1.0, 0.4)
PENDING_ALPHA = 0.45  # a queued or unanswered prompt is drawn faint
POINT_RADIUS_PX = 5.0
CIRCLE_SEGMENTS = 16


@dataclass
class Shape:
    """Something to draw in a view: a ``"point"`` (``xy`` its centre, (1, 2)) or a closed ``"box"`` (``xy`` its
    four corners, (4, 2)), in the view's XY pixels; ``rgba`` in 0..1."""

    kind: str
    xy: np.ndarray
    rgba: tuple


def slice_plane(slice_node) -> tuple[np.ndarray, np.ndarray]:
    """``(origin, unit normal)`` of a slice view's plane in world RAS."""
    slice_to_ras = _to_numpy(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2]
    return slice_to_ras[:3, 3].copy(), normal / np.linalg.norm(normal)


def half_thickness(volume_node, normal: Sequence[float]) -> float:
    """Half the extent of one voxel of the volume along ``normal`` (world): how far from a view's plane a
    prompt may lie and still be on the slice shown."""
    axes = volume_ijk_to_world(volume_node)[:3, :3]
    return 0.5 * float(np.abs(np.asarray(normal, float) @ axes).sum())


def ras_to_xy(slice_node) -> np.ndarray:
    """4x4 from world RAS to the view's XY pixels (the inverse of the slice node's ``XYToRAS``)."""
    return np.linalg.inv(_to_numpy(slice_node.GetXYToRAS()))


def _xy(matrix: np.ndarray, world: np.ndarray) -> np.ndarray:
    world = np.atleast_2d(world)
    return (np.c_[world, np.ones(len(world))] @ np.transpose(matrix))[:, :2]


def box_corners(corners_zyx: Sequence, axis: int) -> np.ndarray:
    """The four ``(z, y, x)`` corners of the rectangle of the voxel grid spanned by two opposite corners, on
    the first corner's slice along ``axis``."""
    a, b = (np.asarray(c, float) for c in corners_zyx)
    u, v = (i for i in range(3) if i != axis)
    out = np.repeat(a[None], 4, axis=0)
    out[1, u] = b[u]
    out[2, u], out[2, v] = b[u], b[v]
    out[3, v] = b[v]
    return out


def shapes_on_slice(prompts: Iterable[Prompt], volume_node, slice_node, axis: int) -> list[Shape]:
    """What a slice view shows of ``prompts`` (see the module docstring)."""
    origin, normal = slice_plane(slice_node)
    tolerance = half_thickness(volume_node, normal) + 1e-6
    to_xy = ras_to_xy(slice_node)
    shapes = []
    for prompt in prompts:
        alpha = PENDING_ALPHA if prompt.pending else 1.0
        if prompt.kind == "point":
            world = zyx_to_world(volume_node, prompt.zyx)
            if abs(float(normal @ (world - origin))) <= tolerance:
                color = POSITIVE if prompt.positive else NEGATIVE
                shapes.append(Shape("point", _xy(to_xy, world), (*color, alpha)))
        elif prompt.kind == "box":
            world = np.array([zyx_to_world(volume_node, c) for c in box_corners(prompt.zyx, axis)])
            if np.all(np.abs((world - origin) @ normal) <= tolerance):
                shapes.append(Shape("box", _xy(to_xy, world), (*BOX, alpha)))
    return shapes


def rubber_band(volume_node, slice_node, ras_a, ras_b, axis: int) -> Shape:
    """The box being dragged from world ``ras_a`` to ``ras_b``, as the voxel-grid rectangle it will send."""
    corners = box_corners([world_to_zyx(volume_node, ras_a), world_to_zyx(volume_node, ras_b)], axis)
    world = np.array([zyx_to_world(volume_node, c) for c in corners])
    return Shape("box", _xy(ras_to_xy(slice_node), world), (*RUBBER_BAND, 1.0))


def fill_polydata(polydata, shapes: Iterable[Shape], radius: float = POINT_RADIUS_PX,
                  segments: int = CIRCLE_SEGMENTS) -> None:
    """Replace ``polydata``'s content with ``shapes``: each point a filled disk of ``radius`` pixels, each
    box a closed line; colours as RGBA point scalars (a ``vtkPolyDataMapper2D`` uses them directly)."""
    import vtk

    points, polys, lines = vtk.vtkPoints(), vtk.vtkCellArray(), vtk.vtkCellArray()
    colors = vtk.vtkUnsignedCharArray()
    colors.SetName("Colors")
    colors.SetNumberOfComponents(4)
    angles = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    circle = np.c_[np.cos(angles), np.sin(angles)] * float(radius)
    for shape in shapes:
        rgba = [int(round(255 * max(0.0, min(1.0, c)))) for c in shape.rgba]
        outline = shape.xy[0] + circle if shape.kind == "point" else np.asarray(shape.xy, float)
        cell = polys if shape.kind == "point" else lines
        first = points.GetNumberOfPoints()
        for x, y in outline:
            points.InsertNextPoint(float(x), float(y), 0.0)
            colors.InsertNextTuple4(*rgba)
        ids = list(range(first, first + len(outline)))
        if cell is lines:
            ids.append(first)  # closed
        cell.InsertNextCell(len(ids))
        for i in ids:
            cell.InsertCellPoint(i)
    polydata.SetPoints(points)
    polydata.SetPolys(polys)
    polydata.SetLines(lines)
    polydata.GetPointData().SetScalars(colors)
    polydata.Modified()


def view_shapes(prompts: Iterable[Prompt], volume_node, slice_node, axis: int,
                band: Optional[tuple] = None) -> list[Shape]:
    """The shapes of one view: its prompts, and the rubber band ``(ras_a, ras_b)`` when one is dragged there."""
    shapes = shapes_on_slice(prompts, volume_node, slice_node, axis) if volume_node is not None else []
    if band is not None and volume_node is not None:
        shapes.append(rubber_band(volume_node, slice_node, band[0], band[1], axis))
    return shapes
