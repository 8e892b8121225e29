"""Environments that meet the batched protocol of ``training.envs.protocol``."""
