"""Residual delta-waypoint RL for driving: toy world, SFT trainer, PPO trainer.

Importing ``training`` registers the single-world Gymnasium view ``ToyWaypoint-v0``.
"""

from training.envs.toy.gym_view import register_gym_envs

register_gym_envs()
