"""Continuous lines that MetaDrive's ramp blocks build across a road's lanes are found and taken out
of the physics world, and no other line is: the geometry on hand-made segments, then a
development seed whose in-ramp has such a line (every car following a lane there was ended as off
road) next to one whose map has no ramp."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip(
    "metadrive", reason="the metadrive extra is not installed (pip install -e '.[metadrive]')"
)

from panda3d.core import Vec3

from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.headless import (
    HeadlessMetaDriveEnv,
    _segment_distances,
    lines_across_lanes,
    remove_lines_across_lanes,
)

IN_RAMP_SEED = 1_000_000_014  # blocks I X C r: a solid line crosses the in-ramp road 19-24 m in
NO_RAMP_SEED = 1_000_000_001  # blocks I S S C


def _pt(x: float, y: float) -> np.ndarray:
    return np.array([x, y], dtype=np.float64)


def test_segment_distance_is_zero_across_and_the_gap_otherwise() -> None:
    lane = (_pt(0, 0), _pt(10, 0))
    across = _segment_distances(_pt(5, -2), _pt(5, 2), *lane)
    parallel_edge = _segment_distances(_pt(0, 1.75), _pt(10, 1.75), *lane)
    ends_short = _segment_distances(_pt(5, 3), _pt(5, 0.5), *lane)
    beyond_the_end = _segment_distances(_pt(13, -1), _pt(13, 1), *lane)
    assert across == 0.0
    assert parallel_edge == pytest.approx(1.75)
    assert ends_short == pytest.approx(0.5)
    assert beyond_the_end == pytest.approx(3.0)


def _solid_bodies(env: HeadlessMetaDriveEnv) -> int:
    return sum("SOLID" in node.getName() for block in env.current_map.blocks for node in block.static_nodes)


def _solid_hits(env: HeadlessMetaDriveEnv, start: np.ndarray, end: np.ndarray) -> list[float]:
    """Where (fraction of the ray) a ray at 0.5 m height from ``start`` to ``end`` meets solid lines."""
    ray = env.engine.physics_world.static_world.rayTestAll(Vec3(*start, 0.5), Vec3(*end, 0.5))
    return sorted(hit.getHitFraction() for hit in ray.getHits() if "SOLID" in hit.getNode().getName())


@pytest.fixture(scope="module")
def env() -> HeadlessMetaDriveEnv:
    env = HeadlessMetaDriveEnv(MetaDriveWorldConfig().metadrive_config(), remove_crossing_lines=False)
    yield env
    env.close()


def test_a_line_across_the_in_ramp_is_found_and_removed_and_the_road_edges_stay(env) -> None:
    env.reset(seed=IN_RAMP_SEED)
    lanes = env.current_map.road_network.graph["3r0_0_"]["3r0_1_"]
    centre = [np.asarray(lanes[1].position(s, 0.0)) for s in (10.0, 30.0)]
    across = [np.asarray(lanes[0].position(12.0, -4.0)), np.asarray(lanes[2].position(12.0, 4.0))]
    assert _solid_hits(env, *centre), "MetaDrive's map has a solid line across lane 1"
    edges_before = _solid_hits(env, *across)

    found = lines_across_lanes(env.current_map)
    assert found and {block.ID for block, _ in found} == {"r"}
    bodies = _solid_bodies(env)
    assert remove_lines_across_lanes(env.current_map, env.engine.physics_world) == len(found)

    assert _solid_bodies(env) == bodies - len(found)
    assert lines_across_lanes(env.current_map) == []
    assert _solid_hits(env, *centre) == [], "lane 1 is clear"
    assert len(edges_before) >= 2 and _solid_hits(env, *across) == edges_before, "both road edges stay"


def test_a_map_without_ramps_keeps_every_line(env) -> None:
    env.reset(seed=NO_RAMP_SEED)
    assert {block.ID for block in env.current_map.blocks} == {"I", "S", "C"}
    assert lines_across_lanes(env.current_map) == []
