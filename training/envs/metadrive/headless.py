"""MetaDrive without its 3D asset archive: what the adapter runs, and the one place that knows why.

MetaDrive 0.4.3 keeps its 3D models and textures out of the wheel. ``BaseEngine.__init__`` calls
``BaseEngine.try_pull_asset()``, which downloads the archive (``metadrive.pull_asset``) into the
package folder whenever ``metadrive/assets`` is missing, whatever the config says. Headless
(``use_render=False``, ``image_observation=False``) the engine opens no window
(``engine.win is None``) and ``AssetLoader.init_loader`` never loads a model, so nothing reads
the assets: the physics, the road network, traffic, the IDM policy and navigation all run
without them. MetaDrive has no config key or environment variable that skips the download.

``HeadlessMetaDriveEnv`` therefore skips ``try_pull_asset`` while its own engine is created
(``lazy_init``) and only when it renders nothing; with the assets installed it leaves MetaDrive's
check in place, and a config that renders without the assets is refused with one line before
anything starts (``pull_asset`` would otherwise fail on the network, or wait forever on the
lock file of another process that is downloading). Nothing is written into site-packages.

MetaDrive also allocates one dict entry per scenario seed (``PGMapManager.maps``, sized by
``num_scenarios``), so the protocol's unbounded scenario seeds (up to ~2e9 here) would need
gigabytes (and ``PGMapManager.clear_stored_maps`` refills that dict when the engine closes: a
closing world asked for tens of GB). ``_OpenSeedMapManager`` builds each map on demand and keeps none
(``store_map=False``).

MetaDrive's ramp blocks (``InRampOnStraight`` "r", ``OutRampOnStraight`` "R") sometimes build a
continuous-line body that runs across the whole carriageway (found on development seeds: a white
solid line crossing the centre line of every lane of the road, at 15-60 degrees). A car touching a
continuous line is off the road by MetaDrive's rule, so every driver that follows any lane there
is ended, MetaDrive's own ``IDMPolicy`` included. Lane lines run along lanes, never across a lane
that continues, so ``lines_across_lanes`` finds the continuous-line bodies that lie within a car's
half width of a continuing lane's centre line (segment geometry, from each body's box), and the map
manager takes them out of the physics world when it loads a map (``remove_lines_across_lanes``;
MetaDrive's rule stays as it is for every other line).
"""

from __future__ import annotations

import importlib.util
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from metadrive.constants import Decoration
from metadrive.engine.base_engine import BaseEngine
from metadrive.envs.base_env import BaseEnv
from metadrive.envs.metadrive_env import MetaDriveEnv
from metadrive.manager.base_manager import BaseManager
from metadrive.manager.object_manager import TrafficObjectManager
from metadrive.manager.pg_map_manager import PGMapManager
from metadrive.manager.traffic_manager import PGTrafficManager

from training.common.errors import UserError

SCENARIO_SEED_SPACE = 2**32  # numpy's RandomState takes seeds below 2^32; MetaDrive seeds it with ours
PULL_ASSETS_COMMAND = "python -m metadrive.pull_asset"
# lines_across_lanes: a car 1.85 m wide that follows a lane's centre line touches a line closer than
# 0.93 m (+ the line's 0.03 m half width) to it; a lane's own lines lie half its width away (1.75 m)
LANE_BAND_M = 1.0
LANE_BAND_FRACTION = 0.35


def metadrive_asset_dir() -> Path:
    spec = importlib.util.find_spec("metadrive")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("metadrive is not installed: pip install -e '.[metadrive]'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def assets_installed() -> bool:
    """Whether MetaDrive's 3D asset archive has been unpacked into the package."""
    return (metadrive_asset_dir() / "version.txt").is_file()


def needs_assets(config: dict[str, Any]) -> bool:
    """Whether a ``MetaDriveEnv`` config renders anything (a window or camera images)."""
    return bool(config.get("use_render", False) or config.get("image_observation", False))


def check_assets(config: dict[str, Any]) -> None:
    """Refuse, in one line, a config that renders while the assets are missing."""
    if needs_assets(config) and not assets_installed():
        raise UserError(
            f"MetaDrive's 3D assets are not installed in {metadrive_asset_dir()} and this config renders "
            f"(use_render or image_observation); fetch them once with internet access: {PULL_ASSETS_COMMAND}"
        )


def _continuing_lanes(graph: dict) -> Iterator[Any]:
    """Every driving lane that continues where its road ends: all lanes of a road, except those
    with an index beyond the widest road that follows (a merge lane ending, closed by a taper line)."""
    for start, ends in graph.items():
        if start == Decoration.start:
            continue
        for end, lanes in ends.items():
            widest = max((len(following) for following in graph.get(end, {}).values()), default=len(lanes))
            yield from lanes[:widest]


def _solid_line_segments(current_map: Any) -> tuple[list[tuple[Any, Any]], np.ndarray, np.ndarray]:
    """The continuous-line bodies of the map's blocks, ``[(block, node)]``, and their end points
    ``[S, 2]`` each (a body is a thin box centred on its segment, turned to its heading)."""
    owned, centres, halves = [], [], []
    for block in current_map.blocks:
        for node in block.static_nodes:
            if "SOLID" not in node.getName() or node.getNumShapes() == 0:
                continue
            transform = node.getTransform()
            heading = math.radians(transform.getHpr()[0])
            half_length = node.getShape(0).getHalfExtentsWithoutMargin()[0]
            owned.append((block, node))
            centres.append((transform.getPos()[0], transform.getPos()[1]))
            halves.append((half_length * math.cos(heading), half_length * math.sin(heading)))
    centres_array = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    halves_array = np.asarray(halves, dtype=np.float64).reshape(-1, 2)
    return owned, centres_array - halves_array, centres_array + halves_array


def _point_to_segments(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Distance ``[...]`` from each point to its segment (all arrays broadcast, last axis x, y)."""
    along = ends - starts
    length_sq = np.maximum((along**2).sum(-1), 1e-12)
    t = np.clip(((points - starts) * along).sum(-1) / length_sq, 0.0, 1.0)
    return np.linalg.norm(points - (starts + t[..., None] * along), axis=-1)


def _cross(o: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """z of ``(p - o) x (q - o)``: its sign says on which side of the line ``o -> p`` the point ``q`` is."""
    return (p[..., 0] - o[..., 0]) * (q[..., 1] - o[..., 1]) - (p[..., 1] - o[..., 1]) * (
        q[..., 0] - o[..., 0]
    )


def _segment_distances(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Distance between segments ``a0-a1`` and ``b0-b1`` (broadcast): 0 where they cross."""
    crossing = (np.sign(_cross(a0, a1, b0)) * np.sign(_cross(a0, a1, b1)) < 0) & (
        np.sign(_cross(b0, b1, a0)) * np.sign(_cross(b0, b1, a1)) < 0
    )
    nearest = np.minimum.reduce(
        [
            _point_to_segments(a0, b0, b1),
            _point_to_segments(a1, b0, b1),
            _point_to_segments(b0, a0, a1),
            _point_to_segments(b1, a0, a1),
        ]
    )
    return np.where(crossing, 0.0, nearest)


def lines_across_lanes(current_map: Any, step_m: float = 1.0) -> list[tuple[Any, Any]]:
    """Continuous-line bodies that a car following a continuing lane's centre line would touch:
    within ``LANE_BAND_M`` (or ``LANE_BAND_FRACTION`` of a narrower lane's width) of that centre
    line, sampled every ``step_m``. ``[(block, node)]``."""
    owned, starts, ends = _solid_line_segments(current_map)
    found: dict[int, tuple[Any, Any]] = {}
    if not owned:
        return []
    for lane in _continuing_lanes(current_map.road_network.graph):
        pieces = max(math.ceil(lane.length / step_m), 1)
        centre = np.array([lane.position(lane.length * i / pieces, 0.0) for i in range(pieces + 1)])
        band = min(LANE_BAND_M, LANE_BAND_FRACTION * lane.width)
        low, high = centre.min(0) - band, centre.max(0) + band
        near = np.flatnonzero(
            (np.maximum(starts, ends) >= low).all(-1) & (np.minimum(starts, ends) <= high).all(-1)
        )
        if near.size == 0:
            continue
        distances = _segment_distances(
            starts[near, None], ends[near, None], centre[None, :-1], centre[None, 1:]
        )  # [lines, pieces]
        for index in near[(distances < band).any(-1)]:
            found[int(index)] = owned[index]
    return list(found.values())


def remove_lines_across_lanes(current_map: Any, physics_world: Any) -> int:
    """Take the bodies ``lines_across_lanes`` finds out of the physics world (and out of their
    block's list, so that unloading the map does not remove them twice); returns how many."""
    found = lines_across_lanes(current_map)
    for block, node in found:
        physics_world.static_world.remove(node)
        block.static_nodes.remove(node)
    return len(found)


class _OpenSeedMapManager(PGMapManager):
    """``PGMapManager`` for any seed below ``SCENARIO_SEED_SPACE``, without one entry per possible
    seed, that takes lines running across lanes out of each map it loads."""

    def __init__(self, remove_crossing_lines: bool = True) -> None:
        BaseManager.__init__(self)  # not PGMapManager.__init__, which fills maps for every seed
        self.current_map = None
        self.start_seed = 0
        self.env_num = SCENARIO_SEED_SPACE
        self.maps = defaultdict(lambda: None)
        self.remove_crossing_lines = remove_crossing_lines

    def reset(self) -> None:
        super().reset()  # spawns (and attaches) this seed's map
        if self.remove_crossing_lines:
            remove_lines_across_lanes(self.current_map, self.engine.physics_world)

    def clear_stored_maps(self) -> None:
        """``PGMapManager.clear_stored_maps`` without refilling one entry per possible seed: theirs
        rebuilds a dict of ``SCENARIO_SEED_SPACE`` entries when the engine closes (tens of GB)."""
        for stored in self.maps.values():
            if stored is not None:
                stored.detach_from_world()
                stored.destroy()
        self.maps = defaultdict(lambda: None)


class HeadlessMetaDriveEnv(MetaDriveEnv):
    """``MetaDriveEnv`` that runs without the asset archive when it renders nothing.

    Scenario seeds: ``reset(seed)`` takes any seed in ``[0, SCENARIO_SEED_SPACE)``.
    ``remove_crossing_lines``: take continuous lines that run across lanes out of every map (see
    the module's docstring); False keeps MetaDrive's maps as they are.
    """

    def __init__(self, config: dict[str, Any], remove_crossing_lines: bool = True) -> None:
        check_assets(config)
        self.remove_crossing_lines = remove_crossing_lines
        super().__init__(
            {**config, "start_seed": 0, "num_scenarios": SCENARIO_SEED_SPACE, "store_map": False}
        )

    def lazy_init(self) -> None:
        if assets_installed() or needs_assets(self.config):
            super().lazy_init()
            return
        original = BaseEngine.__dict__["try_pull_asset"]
        BaseEngine.try_pull_asset = staticmethod(_skip_asset_pull)
        try:
            super().lazy_init()
        finally:
            BaseEngine.try_pull_asset = original

    def setup_engine(self) -> None:
        """``MetaDriveEnv.setup_engine`` with the open-seed map manager."""
        BaseEnv.setup_engine(self)
        self.engine.register_manager("map_manager", _OpenSeedMapManager(self.remove_crossing_lines))
        self.engine.register_manager("traffic_manager", PGTrafficManager())
        if abs(self.config["accident_prob"]) > 1e-2:
            self.engine.register_manager("object_manager", TrafficObjectManager())


def _skip_asset_pull() -> None:
    """Stands in for ``BaseEngine.try_pull_asset`` while a headless engine starts: no download."""
