"""Stable-Baselines3 PPO on the toy world, set up like our residual PPO: the throughput baseline.

    python -m benchmarks.sb3_side_by_side --sft-checkpoint model.pt [--num-envs 16] [--json]

The same problem through SB3's usual route:

- ``num_envs`` single-world Gymnasium views (``ToyWaypoint-v0``) in a ``DummyVecEnv`` (SB3's default
  vectorisation; ``SubprocVecEnv`` cannot help on 2 cores already used by the learner);
- the same frozen SFT model as the features extractor: features ``concat(z, sft_plan / scale)``,
  exactly what our heads read;
- the same residual action: a vectorised wrapper adds the policy's action, bounded to
  ``+-max_delta`` (SB3 clips to the action space), to the SFT plan of the current observation;
- the same heads (two hidden layers of 256, tanh), initial log std, rollout length, minibatch
  size, epochs, learning rate, clip and loss weights; no KL early stop on either side, so both run
  every epoch.

What differs is how SB3 works: worlds step one at a time, observations cross numpy, the frozen
encoder runs again inside every PPO minibatch (SB3 stores observations, not features), and the
wrapper runs it once more to form the residual's base plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from training.common.device import set_cpu_threads
from training.common.errors import UserError, exit_on_user_error
from training.envs.toy.gym_view import ToyWaypointGymEnv
from training.sft.model import WaypointModel, load_sft_model

try:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper
except ImportError as error:  # an optional extra: the caller gets one clear line
    raise UserError(
        f"the Stable-Baselines3 side-by-side needs the 'bench' extra ({error}); "
        "install it with: pip install -e '.[bench]'"
    ) from None


@dataclasses.dataclass
class SB3Settings:
    """The PPO settings both sides share (our ``PPOConfig`` names and defaults)."""

    num_envs: int = 16
    rollout_steps: int = 32
    batch_size: int = 32
    update_epochs: int = 4
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    max_delta: float = 2.0
    init_log_std: float = -2.3
    hidden_size: int = 256
    seed: int = 0


class FrozenSFTExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: the frozen SFT model, ``{bev, state}`` -> ``concat(z, plan / scale)``."""

    def __init__(self, observation_space: gym.spaces.Dict, sft_model: WaypointModel) -> None:
        features_dim = sft_model.feature_dim + 2 * sft_model.num_waypoints
        super().__init__(observation_space, features_dim=features_dim)
        self.sft_model = sft_model.requires_grad_(False).eval()

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        z, plan = self.sft_model.frozen_features(observations["bev"], observations["state"])
        return torch.cat([z, plan.flatten(1) / self.sft_model.config.waypoint_scale], dim=1)


class ResidualPlanVecEnv(VecEnvWrapper):
    """Action = residual ``[K, 2]`` metres in ``+-max_delta``; the worlds get ``sft_plan + residual``."""

    def __init__(self, venv: VecEnv, sft_model: WaypointModel, max_delta: float) -> None:
        shape = venv.action_space.shape
        residual_space = gym.spaces.Box(-max_delta, max_delta, shape, dtype=np.float32)
        super().__init__(venv, action_space=residual_space)
        self.sft_model = sft_model
        self._plan: np.ndarray | None = None

    def _remember_plan(self, obs: dict[str, np.ndarray]) -> None:
        bev, state = torch.from_numpy(obs["bev"]), torch.from_numpy(obs["state"])
        self._plan = self.sft_model.frozen_features(bev, state)[1].numpy()

    def reset(self) -> dict[str, np.ndarray]:
        obs = self.venv.reset()
        self._remember_plan(obs)
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        assert self._plan is not None, "reset() before step()"
        self.venv.step_async(self._plan + actions)

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards, dones, infos = self.venv.step_wait()
        self._remember_plan(obs)  # after an episode end this is the next episode's first observation
        return obs, rewards, dones, infos


class _RolloutTimer(BaseCallback):
    """Wall time SB3 spends collecting rollouts (the rest of ``learn`` is the update)."""

    def __init__(self) -> None:
        super().__init__()
        self.rollout_s = 0.0
        self._started = 0.0

    def _on_rollout_start(self) -> None:
        self._started = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.rollout_s += time.perf_counter() - self._started

    def _on_step(self) -> bool:
        return True


def build_sb3_ppo(sft_model: WaypointModel, settings: SB3Settings) -> PPO:
    """SB3 PPO on ``num_envs`` Gymnasium views with the frozen SFT extractor and residual action."""
    sft_model = sft_model.cpu().requires_grad_(False).eval()
    venv = DummyVecEnv([ToyWaypointGymEnv for _ in range(settings.num_envs)])
    venv.seed(settings.seed)
    env = ResidualPlanVecEnv(venv, sft_model, settings.max_delta)
    hidden = [settings.hidden_size] * 2
    return PPO(
        "MultiInputPolicy",
        env,
        n_steps=settings.rollout_steps,
        batch_size=settings.batch_size,
        n_epochs=settings.update_epochs,
        learning_rate=settings.lr,
        gamma=settings.gamma,
        gae_lambda=settings.gae_lambda,
        clip_range=settings.clip_epsilon,
        ent_coef=settings.entropy_coef,
        vf_coef=settings.value_coef,
        max_grad_norm=settings.max_grad_norm,
        target_kl=None,
        policy_kwargs={
            "features_extractor_class": FrozenSFTExtractor,
            "features_extractor_kwargs": {"sft_model": sft_model},
            "net_arch": {"pi": hidden, "vf": hidden},
            "activation_fn": nn.Tanh,
            "log_std_init": settings.init_log_std,
            "normalize_images": False,  # the SFT encoder divides by 255 itself
        },
        seed=settings.seed,
        device="cpu",
        verbose=0,
    )


def measure_sb3(sft_model: WaypointModel, settings: SB3Settings, rollouts: int = 2) -> dict[str, float]:
    """Train SB3 PPO for ``rollouts`` rollouts (with their updates) and time it.

    Returns:
        ``train_steps_per_s`` (env steps per second of ``learn``), ``rollout_steps_per_s`` (env steps
        per second of rollout collection alone), ``env_steps``, ``wall_time_s``, ``update_share``
        (fraction of the time in PPO updates).
    """
    if rollouts < 1:
        raise UserError(f"rollouts must be >= 1, got {rollouts}")
    model = build_sb3_ppo(sft_model, settings)
    # SB3's default logger makes an empty folder in the temp directory at every learn(), even with
    # verbose=0; one with no outputs and no folder writes nothing
    model.set_logger(Logger(folder=None, output_formats=[]))
    timer = _RolloutTimer()
    started = time.perf_counter()
    model.learn(total_timesteps=rollouts * settings.num_envs * settings.rollout_steps, callback=timer)
    wall = time.perf_counter() - started
    steps = int(model.num_timesteps)
    model.env.close()
    return {
        "train_steps_per_s": steps / wall,
        "rollout_steps_per_s": steps / timer.rollout_s,
        "env_steps": float(steps),
        "wall_time_s": wall,
        "update_share": 1.0 - timer.rollout_s / wall,
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sb3_side_by_side", description=__doc__)
    parser.add_argument("--sft-checkpoint", required=True, help="SFT model.pt (frozen features extractor)")
    parser.add_argument("--num-envs", type=int, default=16, help="Gymnasium views in the DummyVecEnv")
    parser.add_argument("--rollout-steps", type=int, default=32, help="steps per world per rollout")
    parser.add_argument("--batch-size", type=int, default=32, help="PPO minibatch size (transitions)")
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts (with updates) to time")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.num_envs < 1 or args.rollout_steps < 1 or args.batch_size < 1:
        raise UserError("--num-envs, --rollout-steps and --batch-size must be >= 1")
    set_cpu_threads(1)
    settings = SB3Settings(
        num_envs=args.num_envs, rollout_steps=args.rollout_steps, batch_size=args.batch_size
    )
    result = {
        "num_envs": args.num_envs,
        **measure_sb3(load_sft_model(args.sft_checkpoint), settings, args.rollouts),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4g}")


if __name__ == "__main__":
    main()
