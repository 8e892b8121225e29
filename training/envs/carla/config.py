"""Every setting of the CARLA adapter, in one dataclass (units in the names or comments).

Frames: the CARLA server speaks Unreal's left-handed frame (x forward, y right, yaw clockwise
seen from above, degrees). Everything in this package past ``session.py`` uses a right-handed
world frame (x, -y of CARLA; yaw = -CARLA yaw in radians), so the ego frame is x forward,
y left, as in the toy world and the environment protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.envs.toy.config import BEV_CHANNELS, STATE_NAMES, RewardWeights

# A 0.9.16 server listens on its RPC port P, streams sensor data on P + 1 and listens for
# secondary (multi-GPU) servers on P + 2; our traffic manager for that server binds P + 3 on the
# client machine. World i of a batch talks to the server at ``carla_port + i * CARLA_PORT_STRIDE``.
CARLA_PORT_STRIDE = 4
TRAFFIC_MANAGER_PORT_OFFSET = 3

__all__ = [
    "BEV_CHANNELS",
    "CARLA_PORT_STRIDE",
    "STATE_NAMES",
    "TRAFFIC_MANAGER_PORT_OFFSET",
    "CarlaConfig",
    "CarlaRewardWeights",
    "ControllerGains",
]


@dataclass(frozen=True)
class CarlaRewardWeights(RewardWeights):
    """Per-policy-step reward: the toy world's ``RewardWeights`` (same terms, same weights, with
    ``target_speed_mps`` in place of the toy road's speed) plus ``lane_invasion`` per lane
    marking crossed (CARLA's lane-invasion sensor; not terminal)."""

    lane_invasion: float = 1.0


@dataclass(frozen=True)
class ControllerGains:
    """Waypoint tracking: pure pursuit for steering, PID on speed for throttle and brake."""

    lookahead_time_s: float = 0.6
    min_lookahead_m: float = 3.0
    speed_kp: float = 0.5  # throttle per m/s of speed error
    speed_ki: float = 0.1  # per m of integrated speed error
    speed_kd: float = 0.02  # per m/s^2
    integral_limit: float = 5.0  # m: anti-windup bound on the integrated speed error
    speed_lead_time_s: float = 0.25  # the set-point is read this far ahead in the plan
    max_throttle: float = 0.75
    max_brake: float = 1.0
    stop_speed_mps: float = 0.3  # below this set-point, hold the brake


@dataclass(frozen=True)
class CarlaConfig:
    """The CARLA environment. Lengths in metres, times in seconds, angles in radians."""

    town: str = "Town01"
    difficulty: float = 0.5  # 0..1: share of ``max_traffic`` vehicles spawned around the ego
    # timing: the server ticks ``sim_dt`` (synchronous mode, fixed step); the policy acts every ``policy_dt``
    sim_dt: float = 0.1
    policy_dt: float = 0.5
    num_waypoints: int = 8
    waypoint_dt: float = 0.5
    max_episode_steps: int = 50
    settle_ticks: int = 3  # ticks after spawning, so that vehicles land on the road
    # route and speeds
    route_length_m: float = 150.0
    route_spacing_m: float = 1.0
    route_lead_out_m: float = 60.0  # route drawn and planned beyond the goal
    target_speed_mps: float = 8.0
    max_lateral_accel: float = 2.0  # sets the curvature-limited target speed
    start_speed_range: tuple[float, float] = (0.0, 6.0)
    # expert
    expert_recovery_time_s: float = 1.0
    expert_accel: float = 1.5
    expert_decel: float = 3.0
    expert_gap_m: float = 8.0  # distance kept to a vehicle ahead on the route
    expert_route_halfwidth_m: float = 1.8  # a vehicle this close to the route blocks it
    # vehicles
    ego_blueprint: str = "vehicle.lincoln.mkz_2020"
    max_traffic: int = 30
    traffic_radius_m: float = 80.0  # traffic spawns within this distance of the ego's start
    wheelbase_m: float = 2.9  # used by pure pursuit; read from the ego's physics when available
    max_steer_rad: float = 1.22  # 70 degrees; read from the ego's physics when available
    # BEV raster (same as the toy world, so one SFT model fits both)
    bev_size_px: int = 64
    bev_resolution_m: float = 0.5
    bev_ego_row: int = 58
    map_radius_m: float = 50.0  # lane segments farther than this from the ego are not drawn
    controller: ControllerGains = field(default_factory=ControllerGains)
    reward: CarlaRewardWeights = field(default_factory=CarlaRewardWeights)

    @property
    def ticks_per_step(self) -> int:
        return round(self.policy_dt / self.sim_dt)

    def validate(self) -> None:
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError("difficulty must be in [0, 1]")
        if self.ticks_per_step < 1 or abs(self.ticks_per_step * self.sim_dt - self.policy_dt) > 1e-9:
            raise ValueError("policy_dt must be a whole multiple of sim_dt")
        if self.num_waypoints < 2 or self.max_episode_steps < 1:
            raise ValueError("num_waypoints must be >= 2 and max_episode_steps >= 1")
        if not 0 <= self.bev_ego_row < self.bev_size_px:
            raise ValueError("bev_ego_row must lie inside the image")
