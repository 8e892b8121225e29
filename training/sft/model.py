"""The supervised (SFT) waypoint model: BEV raster + ego state -> future ego waypoints.

```
bev   uint8 [N, C, H, W] --/255--> CNN (stride-2 convs) --> flatten --> linear --+
state float [N, S] --(x - mean) / std--> MLP ----------------------------------- +--> fuse --> z [N, D]
z --> head MLP --> [N, K, 2] * waypoint_scale --> waypoints_ego_m (metres, ego frame, x forward, y left)
```

The RL stage freezes this model and reads ``encode`` (the feature ``z``) and ``head`` (the base
plan) separately, once per environment step; both accept the observation tensors exactly as an
environment that meets ``training/envs/protocol.py`` returns them. ``frozen_features`` is that
read for a frozen model: inference mode, and on CUDA the encoder under autocast (fp16 by default:
bf16 moved waypoints by up to 6 cm against fp32, fp16 by under 0.6 cm; see docs/benchmarks.md).

Checkpoints (``model.pt``) are dicts of tensors and plain data (``kind: "sft_waypoint_model"``),
saved atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from training.common.errors import UserError
from training.common.io import load_checkpoint, save_checkpoint

SFT_CHECKPOINT_KIND = "sft_waypoint_model"
SFT_FORMAT_VERSION = 1
_BEV_MAX = 255.0  # BEV pixel values are 0..255 whatever their dtype

# Autocast precisions of the frozen encoder on CUDA (``None``: float32). The head always runs in
# float32: in half precision it alone moves far waypoints by centimetres.
FROZEN_PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DEFAULT_FROZEN_PRECISION = "fp16"


@dataclass
class SFTModelConfig:
    """Shapes and sizes of a ``WaypointModel``; stored in ``model.pt`` as a plain dict."""

    bev_shape: tuple[int, int, int] = (4, 64, 64)  # (C, H, W) of the BEV raster
    state_dim: int = 5  # S, entries of the ego state (toy world: 5)
    num_waypoints: int = 8  # K, future positions predicted
    feature_dim: int = 256  # D, size of the shared feature z the RL heads read
    conv_channels: tuple[int, ...] = (12, 24, 48, 64)  # one 3x3 stride-2 conv per entry
    state_hidden_dim: int = 64  # width of the ego-state MLP
    head_hidden_dim: int = 256  # width of the waypoint head's hidden layer
    waypoint_scale: float = 10.0  # metres; the head's raw output is waypoints / waypoint_scale

    def __post_init__(self) -> None:
        self.bev_shape = tuple(int(v) for v in self.bev_shape)  # type: ignore[assignment]
        self.conv_channels = tuple(int(v) for v in self.conv_channels)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["bev_shape"] = list(self.bev_shape)
        data["conv_channels"] = list(self.conv_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SFTModelConfig:
        """Build from ``to_dict()`` output; raises ``TypeError``/``ValueError`` on bad content."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model_config keys {sorted(unknown)}")
        return cls(**data)


class WaypointModel(nn.Module):
    """CNN + MLP encoder to a feature ``z`` and an MLP head from ``z`` to waypoints in metres.

    Attributes:
        config: the ``SFTModelConfig`` it was built from.
        feature_dim: D, the size of ``z``.
        num_waypoints: K.
    """

    def __init__(self, config: SFTModelConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = config.feature_dim
        self.num_waypoints = config.num_waypoints
        channels, height, width = config.bev_shape

        layers: list[nn.Module] = []
        in_ch = channels
        for out_ch in config.conv_channels:
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True)]
            in_ch = out_ch
            height, width = (height + 1) // 2, (width + 1) // 2
        layers.append(nn.Flatten())
        self.bev_encoder = nn.Sequential(*layers)
        self.bev_fc = nn.Linear(in_ch * height * width, config.feature_dim)

        self.state_mlp = nn.Sequential(
            nn.Linear(config.state_dim, config.state_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.state_hidden_dim, config.state_hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(
            nn.Linear(config.feature_dim + config.state_hidden_dim, config.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.waypoint_head = nn.Sequential(
            nn.Linear(config.feature_dim, config.head_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.head_hidden_dim, config.num_waypoints * 2),
        )
        # Ego-state normalisation, fitted on the training data and saved in the state dict.
        self.register_buffer("state_mean", torch.zeros(config.state_dim))
        self.register_buffer("state_std", torch.ones(config.state_dim))

    @torch.no_grad()
    def fit_normalization(self, states: Tensor, waypoints_ego_m: Tensor, min_std: float = 1e-3) -> None:
        """Set the state mean/std buffers from training data and start the head at the mean plan.

        Args:
            states: float ``[M, S]`` ego states of the training set.
            waypoints_ego_m: float ``[M, K, 2]`` expert waypoints (metres) of the training set;
                the head's last bias is set so that an untrained head predicts their mean.
            min_std: floor for the std of a (near) constant state entry.
        """
        states = states.to(self.state_mean.device, torch.float32)
        self.state_mean.copy_(states.mean(dim=0))
        self.state_std.copy_(states.std(dim=0, unbiased=False).clamp_min(min_std))
        mean_plan = waypoints_ego_m.to(self.state_mean.device, torch.float32).mean(dim=0).reshape(-1)
        last = self.waypoint_head[-1]
        assert isinstance(last, nn.Linear)
        last.bias.copy_(mean_plan / self.config.waypoint_scale)

    def _check_obs(self, bev: Tensor, state: Tensor) -> None:
        if bev.dim() != 4 or tuple(bev.shape[1:]) != self.config.bev_shape:
            raise ValueError(
                f"bev must be [N, {', '.join(map(str, self.config.bev_shape))}], got {list(bev.shape)}"
            )
        if state.dim() != 2 or state.shape[1] != self.config.state_dim or state.shape[0] != bev.shape[0]:
            raise ValueError(
                f"state must be [{bev.shape[0]}, {self.config.state_dim}], got {list(state.shape)}"
            )

    def encode(self, bev: Tensor, state: Tensor) -> Tensor:
        """Feature ``z`` float32 ``[N, D]`` from ``bev`` ``[N, C, H, W]`` (uint8 or float, 0..255)
        and ``state`` ``[N, S]`` (raw ego state, normalised here)."""
        self._check_obs(bev, state)
        image = bev.to(torch.float32) * (1.0 / _BEV_MAX)
        bev_feature = torch.relu(self.bev_fc(self.bev_encoder(image)))
        state_norm = (state.to(torch.float32) - self.state_mean) / self.state_std
        state_feature = self.state_mlp(state_norm)
        return self.fuse(torch.cat([bev_feature, state_feature], dim=1))

    def head(self, z: Tensor) -> Tensor:
        """Waypoints float32 ``[N, K, 2]`` in metres, ego frame (x forward, y left), from ``z`` ``[N, D]``."""
        raw = self.waypoint_head(z)
        return raw.view(z.shape[0], self.num_waypoints, 2) * self.config.waypoint_scale

    def forward(self, bev: Tensor, state: Tensor) -> Tensor:
        """``head(encode(bev, state))``: waypoints ``[N, K, 2]`` in metres, ego frame."""
        return self.head(self.encode(bev, state))

    def frozen_features(
        self, bev: Tensor, state: Tensor, precision: str = DEFAULT_FROZEN_PRECISION
    ) -> tuple[Tensor, Tensor]:
        """``(z [N, D], waypoints [N, K, 2] metres)``, both float32, for a frozen model (RL rollouts).

        Runs in inference mode. On CUDA the encoder runs under autocast in ``precision``
        (``FROZEN_PRECISIONS``) and the head in float32. On any other device ``precision`` is
        ignored and the result is exactly ``encode`` then ``head`` (CPU half precision was 14x
        slower on the machine measured). The results are cloned out of inference mode, so they
        can be stored and later fed to modules trained with autograd.

        Raises:
            UserError: ``precision`` is not one of ``FROZEN_PRECISIONS``.
        """
        if precision not in FROZEN_PRECISIONS:
            raise UserError(
                f"unknown encoder precision {precision!r}; choose one of {list(FROZEN_PRECISIONS)}"
            )
        dtype = FROZEN_PRECISIONS[precision] if bev.device.type == "cuda" else None
        with torch.inference_mode():
            if dtype is None:
                z = self.encode(bev, state)
            else:
                with torch.autocast(device_type="cuda", dtype=dtype):
                    z = self.encode(bev, state)
                z = z.float()
            waypoints = self.head(z)
        return z.clone(), waypoints.clone()

    def compile_encoder(self) -> None:
        """Compile the convolution stack with ``torch.compile`` in place (state-dict keys unchanged).

        Optional and off by default: on the 2-core CPU it took about 30 s to compile, sped the
        convolutions alone up by 14% and gave no gain in a training iteration (docs/benchmarks.md).
        """
        self.bev_encoder.compile()


def encoder_macs_per_sample(config: SFTModelConfig) -> dict[str, int]:
    """Multiply-accumulates per sample of ``encode`` and ``head`` (FLOPs are about twice these)."""
    channels, height, width = config.bev_shape
    conv = 0
    in_ch = channels
    for out_ch in config.conv_channels:
        height, width = (height + 1) // 2, (width + 1) // 2
        conv += height * width * out_ch * in_ch * 9
        in_ch = out_ch
    fc = in_ch * height * width * config.feature_dim
    state = config.state_dim * config.state_hidden_dim + config.state_hidden_dim**2
    fuse = (config.feature_dim + config.state_hidden_dim) * config.feature_dim
    head = config.feature_dim * config.head_hidden_dim + config.head_hidden_dim * config.num_waypoints * 2
    return {"encode": conv + fc + state + fuse, "head": head, "conv": conv}


def save_sft_checkpoint(
    path: str | Path,
    model: WaypointModel,
    env_spec_dict: dict[str, Any],
    train_config_dict: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Save ``model`` with its config, the env spec and training record to ``path`` atomically.

    Returns:
        The checkpoint dict that was written (tensors on the CPU).
    """
    checkpoint = {
        "kind": SFT_CHECKPOINT_KIND,
        "format_version": SFT_FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "env_spec": dict(env_spec_dict),
        "train_config": dict(train_config_dict),
        "metrics": dict(metrics),
    }
    save_checkpoint(path, checkpoint)
    return checkpoint


_REQUIRED_KEYS = ("format_version", "model_config", "state_dict", "env_spec")


def model_from_checkpoint(checkpoint: dict[str, Any], source: str = "checkpoint") -> WaypointModel:
    """Build a ``WaypointModel`` (eval mode, CPU) from an already loaded SFT checkpoint dict.

    Raises:
        UserError: a key is missing, the format version is unknown, or the weights do not fit.
    """
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"SFT checkpoint {source} is malformed: missing {', '.join(missing)}")
    version = checkpoint["format_version"]
    if version != SFT_FORMAT_VERSION:
        raise UserError(
            f"SFT checkpoint {source} has format_version {version!r}, this code reads {SFT_FORMAT_VERSION}"
        )
    model_config = checkpoint["model_config"]
    if not isinstance(model_config, dict):
        raise UserError(f"SFT checkpoint {source} is malformed: model_config is not a dict")
    try:
        config = SFTModelConfig.from_dict(model_config)
        model = WaypointModel(config)
    except (TypeError, ValueError) as err:
        raise UserError(f"SFT checkpoint {source} has a bad model_config ({err})") from None
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, dict):
        raise UserError(f"SFT checkpoint {source} is malformed: state_dict is not a dict")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:3])
        raise UserError(
            f"SFT checkpoint {source}: weights do not match its model_config ({reason})"
        ) from None
    model.eval()
    return model


def load_sft_model(path: str | Path, device: str | torch.device = "cpu") -> WaypointModel:
    """Load ``model.pt`` into a ``WaypointModel`` on ``device``, in eval mode.

    The caller freezes it (``model.requires_grad_(False)``) when it only reads from it.

    Raises:
        UserError: the file is missing, corrupt, unsafe, of another kind, or malformed.
    """
    checkpoint = load_checkpoint(path, expected_kind=SFT_CHECKPOINT_KIND)
    model = model_from_checkpoint(checkpoint, source=str(path))
    return model.to(device)


__all__ = [
    "DEFAULT_FROZEN_PRECISION",
    "FROZEN_PRECISIONS",
    "SFT_CHECKPOINT_KIND",
    "SFTModelConfig",
    "WaypointModel",
    "encoder_macs_per_sample",
    "load_sft_model",
    "model_from_checkpoint",
    "save_sft_checkpoint",
]
