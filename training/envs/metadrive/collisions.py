"""Which object a collision was with, and which of the two was moving into the other.

MetaDrive flags a collision (``crash_vehicle``, ``crash_object``) but not the object, nor who drove
into whom, and its traffic never yields to the ego: a car turning across an intersection drives into
an ego standing at the stop line as readily as the ego runs into a car ahead. To tell those apart,
the object touched is the one whose box is nearest the ego's, and each party's *closing speed* is
its velocity along the line between the two centres, towards the other. The ego is ``standing``
below ``STANDING_MPS``; otherwise the party with the larger closing speed closed the gap.
"""

from __future__ import annotations

import math

import numpy as np

from training.envs.protocol import CLOSED_BY

STANDING_MPS = 0.5


def box_corners(box: np.ndarray) -> np.ndarray:
    """Corners ``[4, 2]`` of a box ``x, y, heading, length, width``."""
    x, y, heading, length, width = box
    along = np.array([math.cos(heading), math.sin(heading)]) * length / 2
    across = np.array([-math.sin(heading), math.cos(heading)]) * width / 2
    centre = np.array([x, y])
    return np.stack(
        [centre + along + across, centre + along - across, centre - along - across, centre - along + across]
    )


def _point_to_box(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Distance ``[P]`` from points ``[P, 2]`` to a box (0 inside it)."""
    x, y, heading, length, width = box
    dx, dy = points[:, 0] - x, points[:, 1] - y
    c, s = math.cos(heading), math.sin(heading)
    along, across = np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy)
    return np.hypot(np.maximum(along - length / 2, 0.0), np.maximum(across - width / 2, 0.0))


def box_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between two boxes ``x, y, heading, length, width`` (0 when a corner of one is
    inside the other). Between disjoint rectangles the nearest points include a corner of one."""
    return float(min(_point_to_box(box_corners(a), b).min(), _point_to_box(box_corners(b), a).min()))


def closing_speeds(
    ego: np.ndarray, ego_speed: float, other: np.ndarray, other_speed: float
) -> tuple[float, float]:
    """Each party's velocity along the line between the centres, towards the other (m/s; negative:
    moving away). ``ego``, ``other``: boxes ``x, y, heading, length, width``; speeds along the heading."""
    line = other[:2] - ego[:2]
    line = line / max(float(np.hypot(*line)), 1e-9)
    ego_closing = ego_speed * (math.cos(ego[2]) * line[0] + math.sin(ego[2]) * line[1])
    other_closing = -other_speed * (math.cos(other[2]) * line[0] + math.sin(other[2]) * line[1])
    return float(ego_closing), float(other_closing)


def closed_by(ego_speed: float, ego_closing: float, other_closing: float) -> str:
    """One of ``CLOSED_BY`` (``"ego"``, ``"ego standing"``, ``"other"``): see the module docstring."""
    ego, ego_standing, other = CLOSED_BY
    if ego_speed < STANDING_MPS:
        return ego_standing
    return ego if ego_closing >= other_closing else other
