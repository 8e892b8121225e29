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
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path
from typing import Any

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


class _OpenSeedMapManager(PGMapManager):
    """``PGMapManager`` for any seed below ``SCENARIO_SEED_SPACE``, without one entry per possible seed."""

    def __init__(self) -> None:
        BaseManager.__init__(self)  # not PGMapManager.__init__, which fills maps for every seed
        self.current_map = None
        self.start_seed = 0
        self.env_num = SCENARIO_SEED_SPACE
        self.maps = defaultdict(lambda: None)

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
    """

    def __init__(self, config: dict[str, Any]) -> None:
        check_assets(config)
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
        self.engine.register_manager("map_manager", _OpenSeedMapManager())
        self.engine.register_manager("traffic_manager", PGTrafficManager())
        if abs(self.config["accident_prob"]) > 1e-2:
            self.engine.register_manager("object_manager", TrafficObjectManager())


def _skip_asset_pull() -> None:
    """Stands in for ``BaseEngine.try_pull_asset`` while a headless engine starts: no download."""
