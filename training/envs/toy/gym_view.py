"""A single-world ``gymnasium.Env`` view of the toy world, registered as ``ToyWaypoint-v0``.

The batched ``ToyWaypointEnv`` (one world, on the CPU) does the work; this view translates
between torch tensors and the Gymnasium API and hides the batched world's autoreset: when an
episode ends, ``step`` returns that episode's *final* observation (with its expert plan and
statistics), and the caller starts the next episode with ``reset``, as Gymnasium expects.

Seeding follows Gymnasium: ``reset(seed=s)`` plays scenario seed ``s`` (the same scenario as
world 0 of the batched world reset with ``s``) and re-seeds ``self.np_random``;
``reset()`` draws the next scenario seed from ``self.np_random``.

The time limit is the world's own (``max_episode_steps``): the world reports the truncation,
so the environment is registered without Gymnasium's ``TimeLimit`` wrapper. To change it,
construct the view with ``max_episode_steps=`` or pass ``config=ToyWorldConfig(...)`` to
``gymnasium.make``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from training.envs.protocol import Observation
from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.world import ToyWaypointEnv

ENV_ID = "ToyWaypoint-v0"
ACTION_BOUND_M = 100.0  # |waypoint coordinate| bound of the action space, metres (ego frame)
_SEED_MODULUS = 2**63  # scenario seeds are int64


def register_gym_envs() -> None:
    """Register ``ToyWaypoint-v0`` once (idempotent); the world truncates episodes itself."""
    if ENV_ID not in gym.registry:
        gym.register(
            id=ENV_ID,
            entry_point="training.envs.toy.gym_view:ToyWaypointGymEnv",
            max_episode_steps=None,
            nondeterministic=False,
        )


class _SingleWorld(ToyWaypointEnv):
    """``ToyWaypointEnv`` that remembers the expert plan and pose of a finished episode's end.

    The batched world reports ``expert_waypoints`` and ``ego_pose`` for the observation *after*
    autoreset; the single-world view needs them for the final observation instead.
    """

    final_expert_waypoints: torch.Tensor | None = None
    final_ego_pose: torch.Tensor | None = None

    def _autoreset(
        self, done: torch.Tensor, final_obs: Observation, bank_start: torch.Tensor | None
    ) -> Observation:
        if bool(done.any()):
            self.final_expert_waypoints = self.expert_waypoints()
            self.final_ego_pose = self.ego_pose()
        return super()._autoreset(done, final_obs, bank_start)


class ToyWaypointGymEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """One toy world on the CPU behind the Gymnasium API.

    Observation: ``{"bev": uint8 [C, H, W], "state": float32 [S]}`` (see ``training/envs/protocol.py``).
    Action: float32 ``[K, 2]`` waypoints in metres, ego frame (x forward, y left), clipped to
    ``+-ACTION_BOUND_M``; a non-finite plan makes the car stop.
    Info: ``expert_waypoints`` float32 ``[K, 2]`` (the expert's plan for the returned observation)
    and ``scenario_seed`` always; ``lateral_deviation_m``, ``speed_mps`` and ``ego_pose`` after a
    step; at the end of an episode ``route_completion``, ``collision``, ``off_road``,
    ``goal_reached``, ``episode_return``, ``episode_length`` and the comfort statistics.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(
        self,
        render_mode: str | None = None,
        difficulty: float | None = None,
        max_episode_steps: int | None = None,
        config: ToyWorldConfig | None = None,
    ) -> None:
        """Args:
        render_mode: ``None`` or ``"rgb_array"``.
        difficulty: overrides ``config.difficulty`` (0..1).
        max_episode_steps: overrides ``config.max_episode_steps`` (policy steps).
        config: the world's settings (``num_envs`` is forced to 1).
        """
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        overrides: dict[str, Any] = {"num_envs": 1}
        if difficulty is not None:
            overrides["difficulty"] = float(difficulty)
        if max_episode_steps is not None:
            overrides["max_episode_steps"] = int(max_episode_steps)
        cfg = dataclasses.replace(config or ToyWorldConfig(), **overrides)
        self.world = _SingleWorld(cfg, device="cpu")
        self.config = cfg
        world_spec = self.world.spec
        self.observation_space = spaces.Dict(
            {
                "bev": spaces.Box(0, 255, world_spec.bev_shape, dtype=np.uint8),
                "state": spaces.Box(-np.inf, np.inf, (world_spec.state_dim,), dtype=np.float32),
            }
        )
        self.action_space = spaces.Box(
            -ACTION_BOUND_M, ACTION_BOUND_M, (world_spec.num_waypoints, 2), dtype=np.float32
        )
        self.render_mode = render_mode
        self._bev: np.ndarray | None = None  # last returned BEV, for render()
        self._scenario_seed = 0
        self._episode_over = True

    # ------------------------------------------------------------------ helpers
    def _obs_dict(self, obs: Observation) -> dict[str, np.ndarray]:
        bev = obs.bev[0].cpu().numpy().copy()
        self._bev = bev.copy()
        return {"bev": bev, "state": obs.state[0].cpu().numpy().astype(np.float32, copy=True)}

    @staticmethod
    def _waypoints(waypoints: torch.Tensor) -> np.ndarray:
        return waypoints[0].cpu().numpy().astype(np.float32, copy=True)

    # ------------------------------------------------------------------ API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode: scenario ``seed`` if given, else one drawn from ``self.np_random``."""
        super().reset(seed=seed)
        if seed is None:
            scenario_seed = int(self.np_random.integers(0, 2**31 - 1))
        else:
            scenario_seed = int(seed) % _SEED_MODULUS
        self._scenario_seed = scenario_seed
        obs = self.world.reset(seed=scenario_seed)
        self._episode_over = False
        info = {
            "expert_waypoints": self._waypoints(self.world.expert_waypoints()),
            "scenario_seed": scenario_seed,
        }
        return self._obs_dict(obs), info

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Track the waypoints ``action`` ``[K, 2]`` (metres, ego frame) for ``policy_dt`` seconds.

        Raises:
            ValueError: ``action`` does not have shape ``[K, 2]``.
            RuntimeError: the episode is over (or never started): call ``reset()``.
        """
        if self._episode_over:
            raise RuntimeError("the episode is over or not started: call reset() before step()")
        plan = np.asarray(action, dtype=np.float32)
        if plan.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {plan.shape}")
        plan = np.clip(plan, -ACTION_BOUND_M, ACTION_BOUND_M)  # NaN stays NaN: the world stops the car
        self.world.final_expert_waypoints = None
        result = self.world.step(torch.from_numpy(plan.copy())[None])
        terminated = bool(result.terminated[0])
        truncated = bool(result.truncated[0])
        info: dict[str, Any] = {
            "scenario_seed": self._scenario_seed,
            "lateral_deviation_m": float(result.info.lateral_deviation_m[0]),
            "speed_mps": float(result.info.speed_mps[0]),
        }
        episode = result.info.episode
        if bool(episode.done[0]):
            # The world has already started its next episode: report the finished one's end.
            self._episode_over = True
            obs = self._obs_dict(result.info.final_observation)
            assert self.world.final_expert_waypoints is not None and self.world.final_ego_pose is not None
            info["expert_waypoints"] = self._waypoints(self.world.final_expert_waypoints)
            info["ego_pose"] = self.world.final_ego_pose[0].cpu().numpy().astype(np.float32)
            info.update(
                route_completion=float(episode.route_completion[0]),
                collision=bool(episode.collision[0]),
                off_road=bool(episode.off_road[0]),
                goal_reached=bool(episode.goal_reached[0]),
                episode_return=float(episode.episode_return[0]),
                episode_length=int(episode.length[0]),
                mean_abs_lateral_m=float(episode.mean_abs_lateral_m[0]),
                mean_abs_jerk=float(episode.mean_abs_jerk[0]),
                mean_abs_steer_rate=float(episode.mean_abs_steer_rate[0]),
            )
        else:
            obs = self._obs_dict(result.obs)
            info["expert_waypoints"] = self._waypoints(result.info.expert_waypoints)
            info["ego_pose"] = result.info.ego_pose[0].cpu().numpy().astype(np.float32)
        return obs, float(result.reward[0]), terminated, truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """The last observation's BEV as an RGB picture ``[H, W, 3]`` uint8 (``rgb_array`` mode)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        if self._bev is None:
            raise RuntimeError("call reset() before render()")
        # Imported here: ``import training`` imports this module, and ``python -m`` runs viz.
        from training.envs.toy.viz import bev_to_rgb

        return bev_to_rgb(self._bev)

    def close(self) -> None:
        self.world.close()
