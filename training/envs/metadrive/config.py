"""Every setting of the MetaDrive adapter, in one dataclass (units in the names or comments).

The observation, action and timing conventions are the toy world's (``ToyWorldConfig``), so an SFT
model trained in one environment fits the other's shape check. The controller and the expert's
plan reuse the toy world's code; ``geometry`` is the ``ToyWorldConfig`` they read, set to MetaDrive's
car (wheelbase, steering limit) and to the local route polyline the adapter builds every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.envs.metadrive.expert import YieldSettings
from training.envs.toy.config import RewardWeights, ToyWorldConfig

# MetaDrive's default car (DefaultVehicle): FRONT_WHEELBASE + REAR_WHEELBASE, and its steering limit.
METADRIVE_WHEELBASE_M = 2.46894
METADRIVE_MAX_STEER_DEG = 40.0
# IDMPolicy.NORMAL_SPEED (30 km/h): the speed MetaDrive's IDM expert cruises at.
IDM_CRUISE_SPEED_MPS = 30.0 / 3.6


def _geometry() -> ToyWorldConfig:
    return ToyWorldConfig(
        num_envs=1,
        wheelbase_m=METADRIVE_WHEELBASE_M,
        length_m=4.515,
        width_m=1.852,
        rear_overhang_m=4.515 / 2 - 1.4166,  # rear axle sits REAR_WHEELBASE behind the body centre
        max_steer_rad=METADRIVE_MAX_STEER_DEG * 3.141592653589793 / 180.0,
        road_speed_mps=IDM_CRUISE_SPEED_MPS,
        # the local route polyline: sampled every metre from lead_in_m behind the ego
        route_spacing_m=1.0,
        lead_in_m=20.0,
    )


@dataclass(frozen=True)
class MetaDriveWorldConfig:
    """One MetaDrive world behind the waypoint protocol. Lengths in metres, times in seconds."""

    difficulty: float = 0.5  # 0..1, see ``metadrive_config`` for what it changes
    # policy steps (100 s) before truncation: the expert needs up to ~80 s for the longest 4-block
    # routes (measured on development seeds: at 120 steps a quarter of its episodes were truncated)
    max_episode_steps: int = 200
    # MetaDrive steps 0.1 s per env.step (5 physics steps of 0.02 s); the controller runs at that rate
    sim_dt: float = 0.1
    route_ahead_m: float = 80.0  # local route polyline length ahead of the ego (BEV, plan, lead search)
    # throttle/brake calibration of MetaDrive's default car, measured: acceleration per unit action
    throttle_accel_mps2: float = 2.76
    brake_decel_mps2: float = 16.3
    # expert (IDM lane choice; speed: curvature limit, stops behind leads and before crossing cars;
    # see training/envs/metadrive/expert.py)
    lead_gap_m: float = 6.0  # bumper-to-bumper distance the expert keeps to a stopped object
    lead_time_gap_s: float = 1.0  # plus this many seconds at the lead's speed
    corridor_margin_m: float = 0.3  # an object this close to the ego's sides is in its way
    yield_margin_m: float = 1.0  # the same for other cars' predicted paths (turning cars cut corners)
    # cars up to yield_horizon_s at the cruise speed from a conflict ahead must be seen
    object_search_radius_m: float = 80.0
    lane_change_hold_s: float = 3.0  # a lane change the expert starts is held this long (or until done)
    idm_search_radius_m: float = 50.0  # what MetaDrive's IDM lane choice sees (its lidar's default)
    yield_horizon_s: float = 6.0  # other cars' paths are predicted this far ahead
    yield_step_s: float = 0.1
    yield_buffer_s: float = 1.5  # the expert and a crossing car are never at one place this close in time
    yield_gap_m: float = 8.0  # front bumper to where a crossing car passes, when stopped for it
    traffic_accel_mps2: float = 1.0  # other cars are predicted to accelerate to the cruise speed at this
    moving_mps: float = 1.0  # slower cars are not predicted to move
    pass_speed_delta_mps: float = 3.0  # pass a slower car in the next lane at most this much faster
    merge_heading_deg: float = 8.0  # a car in the next lane turned towards the ego's by more is followed
    # map and traffic at difficulty 0 and 1 (linear in between)
    map_blocks: tuple[int, int] = (2, 4)
    traffic_density: tuple[float, float] = (0.02, 0.2)
    accident_prob: tuple[float, float] = (0.0, 0.5)
    # take out of each map the continuous lines MetaDrive's ramp blocks sometimes build across every
    # lane of a road (they end any driver there as off road; see headless.py); False keeps them
    remove_crossing_lines: bool = True
    # BEV: the drivable surface is rasterised once per episode at this resolution, then sampled
    drivable_grid_m: float = 0.25
    subpixels: int = 2  # samples per pixel side for surfaces and boxes
    reward: RewardWeights = field(default_factory=RewardWeights)
    geometry: ToyWorldConfig = field(default_factory=_geometry)

    @property
    def substeps(self) -> int:
        return round(self.geometry.policy_dt / self.sim_dt)

    def yield_settings(self) -> YieldSettings:
        return YieldSettings(
            lead_gap_m=self.lead_gap_m,
            lead_time_gap_s=self.lead_time_gap_s,
            corridor_margin_m=self.corridor_margin_m,
            yield_margin_m=self.yield_margin_m,
            yield_horizon_s=self.yield_horizon_s,
            yield_step_s=self.yield_step_s,
            yield_buffer_s=self.yield_buffer_s,
            yield_gap_m=self.yield_gap_m,
            traffic_accel_mps2=self.traffic_accel_mps2,
            moving_mps=self.moving_mps,
            pass_speed_delta_mps=self.pass_speed_delta_mps,
            merge_heading_deg=self.merge_heading_deg,
        )

    def _lerp(self, bounds: tuple[float, float]) -> float:
        return bounds[0] + (bounds[1] - bounds[0]) * self.difficulty

    def metadrive_config(self) -> dict[str, Any]:
        """The ``MetaDriveEnv`` config: headless, no sensors we do not read, our difficulty.

        ``difficulty`` sets the number of map blocks (2 at 0 to 4 at 1: more curves, ramps,
        intersections and roundabouts), the traffic density (0.02 to 0.2) and the probability of
        an accident scene (broken-down car with cones and triangles) per block (0 to 0.5).
        MetaDrive's own time limit is off: the adapter truncates at ``max_episode_steps``.
        """
        no_lasers = {"num_lasers": 0}
        return {
            "use_render": False,
            "image_observation": False,
            "log_level": 50,  # logging.CRITICAL: MetaDrive logs every episode end at INFO
            "horizon": None,
            "store_map": False,  # scenario seeds are unbounded; keep one map in memory
            # MetaDrive recycles vehicles between episodes with their physics state, so a scenario
            # played after another drifted from the same scenario played first (a collision or not)
            "force_destroy": True,
            "map": round(self._lerp(self.map_blocks)),
            "traffic_density": self._lerp(self.traffic_density),
            "accident_prob": self._lerp(self.accident_prob),
            "decision_repeat": round(self.sim_dt / 0.02),
            "physics_world_step_size": 0.02,
            "vehicle_config": {
                "lidar": {"num_lasers": 0, "distance": self.object_search_radius_m},
                "side_detector": no_lasers,
                "lane_line_detector": no_lasers,
            },
        }

    def validate(self) -> None:
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError("difficulty must be in [0, 1]")
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")
        if abs(self.substeps * self.sim_dt - self.geometry.policy_dt) > 1e-9:
            raise ValueError("policy_dt must be a whole multiple of sim_dt")
        if abs(round(self.sim_dt / 0.02) * 0.02 - self.sim_dt) > 1e-9:
            raise ValueError("sim_dt must be a whole multiple of MetaDrive's 0.02 s physics step")
