"""The environment protocol moved to ``training/envs/protocol.py``; this name stays for old imports."""

from training.envs.protocol import *  # noqa: F403
