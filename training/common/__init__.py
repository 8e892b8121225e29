"""Pieces every command shares: user errors, atomic files and checkpoints, CLI from a dataclass."""
