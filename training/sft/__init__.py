"""Supervised (SFT) waypoint model, expert demonstrations and the behaviour-cloning trainer.

Only the model is imported here (torch alone); ``training.sft.data`` and the trainer load the
environment and logging libraries when imported themselves.
"""

from training.sft.model import SFTModelConfig, WaypointModel, load_sft_model, save_sft_checkpoint

__all__ = ["SFTModelConfig", "WaypointModel", "load_sft_model", "save_sft_checkpoint"]
