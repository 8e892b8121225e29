"""A MetaDrive scenario is a function of its seed alone, whatever a worker played before it.

MetaDrive recycles the vehicles of an episode for the next one, physics state included, unless
``force_destroy`` is set: a scenario played after another then drifted from the same scenario
played first (measured: seed 1e9+21 reached its destination when played first and ended in a
collision when played after 1e9+20). The paired SFT-vs-RL comparison and the expert's success rate
rely on every policy meeting the same scenario for the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip(
    "metadrive", reason="the metadrive extra is not installed (pip install -e '.[metadrive]')"
)

from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.world import MetaDriveWorld

SEED, OTHER = 1_000_000_021, 1_000_000_020
STEPS = 4


def _object_states(world: MetaDriveWorld, seed: int) -> list[np.ndarray]:
    """Every object's position, heading and speed after each of ``STEPS`` expert steps."""
    world.reset(seed)
    states = []
    for _ in range(STEPS):
        world.step(world.frame.expert)
        objects = world.env.engine.get_objects().values()
        rows = [[*obj.position, obj.heading_theta, getattr(obj, "speed", 0.0)] for obj in objects]
        states.append(np.array(sorted(map(tuple, rows))))
    return states


def test_a_scenario_replays_exactly_after_another_scenario() -> None:
    world = MetaDriveWorld(MetaDriveWorldConfig())
    try:
        first = _object_states(world, SEED)
        _object_states(world, OTHER)
        again = _object_states(world, SEED)
    finally:
        world.close()
    assert len(first[0]) > 3, "the scenario has traffic to recycle"
    for step, (a, b) in enumerate(zip(first, again, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step + 1}")
