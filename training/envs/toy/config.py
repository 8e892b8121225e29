"""Every setting of the toy world, in one dataclass (units in the names or help strings)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from training.envs.options import EnvOptions
from training.envs.protocol import EnvSpec

COMPILE_ON_CPU_ONLY = "the compiled world step runs on the CPU only: it has not yet been run on a GPU"

BEV_CHANNELS = ("drivable", "route", "vehicles", "obstacles")
# The navigation's distance to the destination is part of the ego state: the goal ends the
# episode, so without it no critic could tell an episode's start from its end.
STATE_NAMES = ("speed_mps", "steer_rad", "accel_mps2", "yaw_rate_radps", "distance_to_goal_m")


def shared_layout_spec(
    bev_size_px: int, num_waypoints: int, waypoint_dt: float, policy_dt: float, max_episode_steps: int
) -> EnvSpec:
    """The observation and action layout of every environment (toy, MetaDrive, CARLA): the toy
    world's BEV channels and ego state, so one SFT model can drive in all of them."""
    return EnvSpec(
        bev_shape=(len(BEV_CHANNELS), bev_size_px, bev_size_px),
        state_dim=len(STATE_NAMES),
        num_waypoints=num_waypoints,
        waypoint_dt=waypoint_dt,
        policy_dt=policy_dt,
        max_episode_steps=max_episode_steps,
        bev_channels=BEV_CHANNELS,
        state_names=STATE_NAMES,
    )


@dataclass(frozen=True)
class RewardWeights:
    """Per-policy-step reward: progress minus deviations, large penalties on failure.

    ``progress`` multiplies route progress normalised by the distance a car at the road's
    speed limit covers in one policy step; ``speed`` multiplies |v - v_target| / v_road
    (Roach's speed term: drive at the curvature-limited target speed, not faster, not slower);
    ``lateral`` is per metre from the route centre line; ``heading`` per radian of heading error.

    The plan terms score the whole plan, not only the part the controller executes before the
    next policy step (about the first second): ``plan_lateral`` per metre of mean distance of the
    K waypoints from the route centre line, ``plan_speed`` per unit of mean |planned speed -
    target speed| / v_road over the K intervals. Without them 6 of the 8 waypoints would get no
    learning signal at all. They use the road and its speed limits only, never the expert.

    The comfort terms, which the comparison reports: ``jerk`` per m/s^3 of the mean |jerk| and
    ``steer_rate`` per rad/s of the mean |steering rate| over the step's controller substeps (or
    simulator ticks). Without them PPO traded comfort for lane keeping (jerk at or above SFT's,
    steering rate up to 26% above). Measured on development scenarios (seed 0's demo SFT model):
    jerk 0.1 or 0.2 cut jerk by a quarter without raising ADE, 0.5 kept the policy from learning to
    avoid parked cars; steering rate 1.5 held it at SFT's (0: 1.11x and 1.26x SFT's in two PPO
    seeds) for the same ADE; 3 brought it below SFT's but slowed learning.
    """

    progress: float = 1.0
    speed: float = 0.5
    lateral: float = 0.5
    heading: float = 1.0
    plan_lateral: float = 1.0
    plan_speed: float = 1.0
    jerk: float = 0.1
    steer_rate: float = 1.5
    collision: float = 10.0
    off_road: float = 10.0


# Reward presets (``--reward``). ``shaped``: every term above. ``progress``: route progress and the
# infractions only, in the spirit of CaRL (simple rewards scale better with the batch and leave
# no plan-shaping term that encodes how the expert drives). ``comfort``: ``progress`` plus the
# comfort terms (jerk and steering rate), which the never-worse selection guards.
SHAPING_TERMS = ("speed", "lateral", "heading", "plan_lateral", "plan_speed", "jerk", "steer_rate")
COMFORT_TERMS = ("jerk", "steer_rate")
REWARD_PRESETS = ("shaped", "progress", "comfort")


def run_reward(weights: RewardWeights, options: EnvOptions) -> RewardWeights:
    """``weights`` under the run's reward preset, with the collision and off-road penalties replaced
    where given (``--collision-penalty`` / ``--off-road-penalty``: how much a failure costs against
    route progress)."""
    weights = reward_preset(weights, options.reward)
    penalties = {"collision": options.collision_penalty, "off_road": options.off_road_penalty}
    return replace(weights, **{name: value for name, value in penalties.items() if value is not None})


def reward_preset(weights: RewardWeights, preset: str) -> RewardWeights:
    """``weights`` for ``preset``: unchanged for ``shaped``; shaping terms at 0 for ``progress``, all
    but the comfort terms for ``comfort``.

    Works on any ``RewardWeights`` subclass (CARLA adds infraction terms, which stay)."""
    if preset not in REWARD_PRESETS:
        raise ValueError(f"unknown reward preset {preset!r} (known: {', '.join(REWARD_PRESETS)})")
    if preset == "shaped":
        return weights
    kept = COMFORT_TERMS if preset == "comfort" else ()
    return replace(weights, **dict.fromkeys((t for t in SHAPING_TERMS if t not in kept), 0.0))


@dataclass(frozen=True)
class ToyWorldConfig:
    """The toy driving world. Lengths in metres, times in seconds, angles in radians."""

    num_envs: int = 16
    difficulty: float = 0.5  # 0..1: scales road curvature and the amount of traffic and obstacles
    # timing
    policy_dt: float = 0.5
    sim_dt: float = 0.1
    num_waypoints: int = 8
    waypoint_dt: float = 0.5
    max_episode_steps: int = 50
    # road
    route_length_m: float = 150.0
    route_spacing_m: float = 1.0
    lead_in_m: float = 20.0  # straight road drawn before the start
    lead_out_m: float = 80.0  # road drawn beyond the goal
    lane_width_m: float = 3.5
    right_shoulder_m: float = 1.0
    left_shoulder_m: float = 0.5
    min_segment_m: float = 20.0
    max_segment_m: float = 45.0
    base_curvature: float = 0.008  # 1/m, the largest curvature at difficulty 0
    curvature_per_difficulty: float = 0.04  # 1/m added at difficulty 1
    curvature_smoothing_m: float = 10.0
    # speeds
    road_speed_mps: float = 8.0
    max_lateral_accel: float = 2.0  # sets the curvature-limited target speed
    comfort_decel: float = 2.0  # backward-smooths the target speed before curves
    start_speed_range: tuple[float, float] = (4.0, 8.0)
    start_lateral_m: float = 0.6  # start offset uniform in +-this
    start_heading_rad: float = 0.08
    # vehicle (kinematic bicycle, reference point the rear axle)
    wheelbase_m: float = 2.8
    length_m: float = 4.5
    width_m: float = 1.8
    rear_overhang_m: float = 0.85
    max_steer_rad: float = 0.5
    max_steer_rate: float = 0.8  # rad/s
    max_accel: float = 3.0  # m/s^2
    max_decel: float = 6.0  # m/s^2
    # controller (pure pursuit + speed P-control)
    lookahead_time_s: float = 0.6
    min_lookahead_m: float = 3.0
    speed_gain: float = 2.0  # 1/s
    speed_lead_time_s: float = 0.25
    # expert
    expert_recovery_time_s: float = 1.0
    expert_accel: float = 1.5
    expert_decel: float = 3.0
    # objects
    max_obstacles: int = 6
    max_vehicles: int = 6
    obstacle_lateral_m: float = -2.6  # parked cars on the right shoulder
    vehicle_lateral_m: float = 3.5  # oncoming traffic in the left lane
    vehicle_speed_range: tuple[float, float] = (5.0, 9.0)
    min_object_s_m: float = 25.0
    # BEV raster
    bev_size_px: int = 64
    bev_resolution_m: float = 0.5
    bev_ego_row: int = 58  # row (from the top) of the ego's rear axle; the ego faces up
    # reward
    reward: RewardWeights = field(default_factory=RewardWeights)

    @property
    def substeps(self) -> int:
        return round(self.policy_dt / self.sim_dt)

    @property
    def max_curvature(self) -> float:
        return self.base_curvature + self.curvature_per_difficulty * self.difficulty

    @property
    def drivable_right_m(self) -> float:
        return -(self.lane_width_m / 2 + self.right_shoulder_m)

    @property
    def drivable_left_m(self) -> float:
        return 1.5 * self.lane_width_m + self.left_shoulder_m

    @property
    def route_points(self) -> int:
        total = self.lead_in_m + self.route_length_m + self.lead_out_m
        return int(round(total / self.route_spacing_m)) + 1

    def validate(self) -> None:
        if self.num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError("difficulty must be in [0, 1]")
        if abs(self.substeps * self.sim_dt - self.policy_dt) > 1e-9 or self.substeps < 1:
            raise ValueError("policy_dt must be a whole multiple of sim_dt")
        if self.num_waypoints < 2:
            raise ValueError("num_waypoints must be >= 2")
        if self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")
        if not 0 <= self.bev_ego_row < self.bev_size_px:
            raise ValueError("bev_ego_row must lie inside the image")
