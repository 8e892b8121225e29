"""Environments that meet the batched protocol of ``training.rl.env_interface``."""
