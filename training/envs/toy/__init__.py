"""The toy driving world: batched torch worlds on any device (see ``world.ToyWaypointEnv``)."""

from training.envs.toy.config import BEV_CHANNELS, STATE_NAMES, RewardWeights, ToyWorldConfig
from training.envs.toy.world import ToyWaypointEnv

__all__ = ["BEV_CHANNELS", "STATE_NAMES", "RewardWeights", "ToyWaypointEnv", "ToyWorldConfig"]
