"""The residual PPO policy: a frozen SFT waypoint model plus a small trained delta head.

```
z, sft_waypoints = sft.frozen_features(bev, state)         # frozen, no gradients
mean_delta       = max_delta * tanh(action_scale * delta_head(z, sft))  # [N, K, 2] m, 0 at init
delta            ~ Normal(mean_delta, exp(log_std))        # log_std: learned, state-independent
final_waypoints  = sft_waypoints + clamp(delta, +-max_delta)
value            = value_head(z, sft)                      # critic sees state and the base action
```

Because the SFT model is frozen, ``z`` and ``sft_waypoints`` are computed once per environment
step (:meth:`PPOPolicy.features`) and stored in the rollout buffer; the PPO epochs only run the
heads on those stored features.

Shapes: ``N`` batch, ``D`` feature size of the SFT encoder, ``K`` waypoints. Waypoints and
deltas are in metres in the ego frame (x forward, y left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from training.common.cli import config_field
from training.common.errors import UserError
from training.rl.losses import kl_to_reference

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "silu": nn.SiLU}
HIDDEN_LAYERS = 2  # hidden layers of each head, ``hidden_size`` wide


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """Everything the policy's heads and distribution are built from: the one home of these settings.

    ``PPOConfig`` offers each field that has a help string as a flag of the same name, default and
    help, and a run's ``config.json`` and checkpoints store them (flat, among the other settings),
    from which :meth:`from_config` rebuilds the policy. ``activation`` and ``waypoint_scale`` have
    no flag: every run so far used their defaults.
    """

    max_delta: float = config_field(2.0, "bound on the residual per waypoint coordinate", "m")
    init_log_std: float = config_field(-2.3, "initial log std of the first waypoint's residual (-2.3: 0.1 m)")
    std_horizon_exponent: float = config_field(
        1.0, "waypoint k starts with std exp(init_log_std) * k^this: far waypoints explore more"
    )
    min_log_std: float = config_field(-4.0, "lower clamp of the log std")
    max_log_std: float = config_field(0.0, "upper clamp of the log std (0: 1 m)")
    action_scale: float = config_field(0.1, "gain on the delta head's raw output before tanh (ResiP)")
    hidden_size: int = config_field(256, "width of the delta and value heads' two hidden layers")
    activation: str = "tanh"  # of the heads' hidden layers: a key of ACTIVATIONS
    waypoint_scale: float = 10.0  # metres by which the SFT waypoints are divided before entering the heads

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size,) * HIDDEN_LAYERS

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PolicySettings:
        """The settings in a run's configuration as ``config.json`` and checkpoints store it (the
        ``PPOConfig`` fields, flat); a setting without a flag that is absent keeps its default.

        Raises:
            UserError: a setting that has a flag is absent (not a configuration of this trainer).
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in config:
                values[field.name] = type(field.default)(config[field.name])
            elif "help" in field.metadata:
                raise UserError(f"the run's configuration lacks the policy setting {field.name!r}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Exploration:
    """How much a rollout explores (progressive exploration); the policy holds one, full by default.

    ``noise_scale`` multiplies the delta's std and the SFT reference's std alike, so the KL to SFT
    compares policies at the same noise level; the applied residual is clipped to ``bound_scale *
    max_delta``. The mean delta itself is never rescaled: the schedule changes what a rollout
    applies, not what the heads compute, so no iteration moves the plan without a gradient step.
    Not saved with the heads: a schedule sets it from the iteration number, and a loaded
    (deployed) policy runs at full scale.
    """

    noise_scale: float = 1.0
    bound_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.noise_scale <= 1 and 0 < self.bound_scale <= 1):
            raise ValueError(
                f"exploration scales must be in (0, 1], got {self.noise_scale}, {self.bound_scale}"
            )


FULL_EXPLORATION = Exploration()


class SFTModel(Protocol):
    """What the policy needs from the supervised model: ``WaypointModel`` (``training/sft/model.py``)
    and ``ExternalSFTModel`` (``training/sft/external.py``, a model of any architecture) offer it."""

    feature_dim: int  # D
    num_waypoints: int  # K

    def frozen_features(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``bev`` uint8 ``[N, C, H, W]``, ``state`` float ``[N, S]`` -> ``(z [N, D], waypoints
        [N, K, 2] metres, ego frame)``, float32, without autograd history (inference only)."""
        ...


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain ``std`` and constant bias (CleanRL's PPO initialisation).

    ``std=0`` gives an all-zero layer (used for the delta head's output layer).
    """
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def _mlp(
    in_dim: int, hidden_sizes: Sequence[int], out_dim: int, activation: str, out_std: float
) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear(out_dim)``, the last layer initialised with gain ``out_std``."""
    if activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    previous = in_dim
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(previous, size)), ACTIVATIONS[activation]()]
        previous = size
    layers.append(layer_init(nn.Linear(previous, out_dim), std=out_std))
    return nn.Sequential(*layers)


def _head_input(z: Tensor, sft_waypoints: Tensor, waypoint_scale: float) -> Tensor:
    """``concat(z [N, D], sft_waypoints [N, K, 2] / waypoint_scale flattened)`` -> ``[N, D + 2K]``."""
    return torch.cat([z, sft_waypoints.flatten(1) / waypoint_scale], dim=-1)


class DeltaHead(nn.Module):
    """Mean residual ``[N, K, 2]`` in metres, bounded to ``(-max_delta, max_delta)`` by ``tanh``.

    The output layer's weights and bias start at exactly zero, so the initial residual is 0
    and the policy's mean plan is the SFT plan. ``action_scale`` multiplies the raw output
    before the ``tanh`` (ResiP's residual scale): Adam moves every weight by about ``lr`` per
    step whatever the gradient's size, so this gain sets how many metres one optimiser step can
    move the plan. Without it (gain ``max_delta``) a single step at ``lr=3e-4`` shifts the mean
    by several times the exploration std and PPO's KL stop ends each update after one step.
    """

    def __init__(self, feature_dim: int, num_waypoints: int, settings: PolicySettings) -> None:
        super().__init__()
        self.num_waypoints = num_waypoints
        self.max_delta = float(settings.max_delta)
        self.action_scale = float(settings.action_scale)
        self.waypoint_scale = float(settings.waypoint_scale)
        self.net = _mlp(
            feature_dim + 2 * num_waypoints,
            settings.hidden_sizes,
            2 * num_waypoints,
            settings.activation,
            0.0,
        )

    def forward(self, z: Tensor, sft_waypoints: Tensor) -> Tensor:
        """``z`` ``[N, D]``, ``sft_waypoints`` ``[N, K, 2]`` (m) -> mean delta ``[N, K, 2]`` (m)."""
        raw = self.net(_head_input(z, sft_waypoints, self.waypoint_scale))
        return (self.max_delta * torch.tanh(self.action_scale * raw)).view(-1, self.num_waypoints, 2)


class ValueHead(nn.Module):
    """Critic ``V(s)`` ``[N]`` from the state features and the base (SFT) action."""

    def __init__(self, feature_dim: int, num_waypoints: int, settings: PolicySettings) -> None:
        super().__init__()
        self.waypoint_scale = float(settings.waypoint_scale)
        self.net = _mlp(feature_dim + 2 * num_waypoints, settings.hidden_sizes, 1, settings.activation, 1.0)

    def forward(self, z: Tensor, sft_waypoints: Tensor) -> Tensor:
        """``z`` ``[N, D]``, ``sft_waypoints`` ``[N, K, 2]`` -> value ``[N]`` (return units)."""
        return self.net(_head_input(z, sft_waypoints, self.waypoint_scale)).squeeze(-1)


def initial_std(num_waypoints: int, init_log_std: float, std_horizon_exponent: float) -> Tensor:
    """The delta's starting std ``[K, 2]`` (m): ``exp(init_log_std) * k ** std_horizon_exponent``.

    It is also the SFT reference policy's std for the KL penalty: a Gaussian centred on the SFT
    plan with exactly the exploration noise the run starts from, so the KL is 0 at the start.
    """
    horizon = torch.arange(1, num_waypoints + 1, dtype=torch.float32).log() * float(std_horizon_exponent)
    return (float(init_log_std) + horizon)[:, None].expand(num_waypoints, 2).exp().clone()


def sum_over_waypoints(x: Tensor) -> Tensor:
    """Sum a per-coordinate quantity ``[N, K, 2]`` over waypoints and axes -> ``[N]``."""
    return x.sum(dim=(-2, -1))


class ActionScores(NamedTuple):
    """What the PPO update needs of stored deltas, with gradients (:meth:`PPOPolicy.evaluate_actions`)."""

    log_prob: Tensor  # [N], summed over waypoints and axes
    entropy: Tensor  # [N], summed over waypoints and axes
    value: Tensor  # [N]
    mean_delta: Tensor  # [N, K, 2] metres: the distribution's mean (for the L2 and KL penalties)


class PPOPolicy(nn.Module):
    """Frozen SFT model + trained :class:`DeltaHead`, :class:`ValueHead` and ``log_std`` ``[K, 2]``.

    Owns the SFT reference policy of the KL penalty (:meth:`reference_std`, :meth:`kl_to_sft`)
    and the rollout's :class:`Exploration`, so the update and the logging read one KL.

    Args:
        sft_model: an :class:`SFTModel` module (``frozen_features(bev, state) -> (z [N, D],
            waypoints [N, K, 2])``, ``feature_dim`` D, ``num_waypoints`` K). It is frozen here:
            ``requires_grad_(False)`` and kept in eval mode whatever ``train()`` is called with.
        settings: the heads and the distribution (:class:`PolicySettings`): ``max_delta`` bounds
            the residual per coordinate (m); waypoint ``k`` (1-based) starts with std
            ``exp(init_log_std) * k ** std_horizon_exponent``, so far waypoints, which the
            controller barely executes before the next plan, can explore widely without
            disturbing the driving while near ones stay precise; ``log_std`` is clamped to
            ``[min_log_std, max_log_std]`` wherever it is used (outside it the clamp passes no
            gradient); ``action_scale`` is the delta head's gain (see :class:`DeltaHead`).
    """

    def __init__(self, sft_model: nn.Module, settings: PolicySettings) -> None:
        super().__init__()
        if not settings.action_scale > 0:
            raise UserError(f"action_scale must be > 0, got {settings.action_scale}")
        if not settings.max_delta > 0:
            raise UserError(f"max_delta must be > 0 metres, got {settings.max_delta}")
        feature_dim = int(sft_model.feature_dim)
        num_waypoints = int(sft_model.num_waypoints)
        initial_log_std = initial_std(
            num_waypoints, settings.init_log_std, settings.std_horizon_exponent
        ).log()
        if not (
            settings.min_log_std <= initial_log_std.min() and initial_log_std.max() <= settings.max_log_std
        ):
            raise UserError(
                f"initial log std {initial_log_std.min():.2f}..{initial_log_std.max():.2f} is outside "
                f"[min_log_std, max_log_std] = [{settings.min_log_std}, {settings.max_log_std}]"
            )
        self.settings = settings
        self.sft_model = sft_model
        self.sft_model.requires_grad_(False)
        self.sft_model.eval()
        self.num_waypoints = num_waypoints
        self.delta_head = DeltaHead(feature_dim, num_waypoints, settings)
        self.value_head = ValueHead(feature_dim, num_waypoints, settings)
        self.log_std = nn.Parameter(initial_log_std)
        # The SFT reference policy of the KL penalty: a Gaussian on the SFT plan with the starting
        # std (not saved: it follows from the settings).
        self.register_buffer("initial_std", initial_log_std.exp(), persistent=False)
        self.exploration = FULL_EXPLORATION

    @property
    def action_bound(self) -> float:
        """What a rollout may apply of the residual per coordinate (m): ``max_delta`` at full exploration."""
        return self.settings.max_delta * float(self.exploration.bound_scale)

    @contextlib.contextmanager
    def deployed(self) -> Iterator[PPOPolicy]:
        """Eval mode at full exploration, as a loaded ``final.pt`` drives; the schedule is restored after."""
        saved, was_training = self.exploration, self.training
        self.exploration = FULL_EXPLORATION
        self.eval()
        try:
            yield self
        finally:
            self.exploration = saved
            self.train(was_training)

    # --- modes and parameters -------------------------------------------------------------------

    def train(self, mode: bool = True) -> PPOPolicy:
        """Set the heads' training mode; the frozen SFT model always stays in eval mode."""
        super().train(mode)
        self.sft_model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters PPO trains (both heads and ``log_std``); build the optimizer from these."""
        return [*self.delta_head.parameters(), *self.value_head.parameters(), self.log_std]

    def _head_items(self) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in self.state_dict().items():
            if not name.startswith("sft_model."):
                yield name, tensor

    def heads_state_dict(self) -> dict[str, Tensor]:
        """The trained part (delta head, value head, ``log_std``), without the SFT weights."""
        return {name: tensor.detach().clone() for name, tensor in self._head_items()}

    def load_heads_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what :meth:`heads_state_dict` returned.

        Raises:
            UserError: a key is missing or unexpected, or a shape differs (e.g. a checkpoint
                trained with other ``hidden_sizes`` or another number of waypoints).
        """
        expected = dict(self._head_items())
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise UserError(
                "policy heads do not match the checkpoint "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise UserError(
                    f"policy heads do not match the checkpoint: {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[name].shape)} (other hidden sizes or waypoint count?)"
                )
        self.load_state_dict(dict(state), strict=False)

    # --- frozen features ------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Run the frozen SFT model: ``bev`` uint8 ``[N, C, H, W]``, ``state`` ``[N, S]`` ->
        ``(z [N, D], sft_waypoints [N, K, 2] metres)``.

        The SFT model's ``frozen_features`` (a ``WaypointModel`` runs in inference mode, on CUDA
        the encoder under fp16 autocast, within 1 cm of fp32) returns tensors without history:
        they can be stored in the rollout buffer and fed to the heads later with gradients
        flowing into the heads only.
        """
        return self.sft_model.frozen_features(bev, state)

    # --- distribution, value, actions -----------------------------------------------------------

    def std(self, noise_scale: Tensor | None = None) -> Tensor:
        """Standard deviation of the delta ``[K, 2]`` in metres (``exp`` of the clamped ``log_std``,
        times the exploration schedule's noise scale, or ``noise_scale``: a compiled update passes
        it as a tensor, which a new schedule value does not recompile)."""
        settings = self.settings
        scale = self.exploration.noise_scale if noise_scale is None else noise_scale
        return self.log_std.clamp(settings.min_log_std, settings.max_log_std).exp() * scale

    def reference_std(self) -> Tensor:
        """Std ``[K, 2]`` (m) of the SFT reference policy, ``Normal(sft_plan, reference_std)``: the
        starting std times the exploration schedule's noise scale, so the KL starts at 0."""
        return self.initial_std * self.exploration.noise_scale

    def kl_to_sft(
        self, mean_delta: Tensor, std: Tensor | None = None, reference_std: Tensor | None = None
    ) -> Tensor:
        """``KL(policy || SFT reference)`` per plan ``[N]`` (nats) for mean deltas ``[N, K, 2]`` (m).

        ``std`` and ``reference_std`` default to :meth:`std` and :meth:`reference_std`; the update
        passes them in, as it does to :meth:`distribution`.
        """
        std = self.std() if std is None else std
        reference_std = self.reference_std() if reference_std is None else reference_std
        return kl_to_reference(mean_delta, std, reference_std)

    def distribution(self, z: Tensor, sft_waypoints: Tensor, std: Tensor | None = None) -> Normal:
        """Per-coordinate ``Normal`` over the delta, batch shape ``[N, K, 2]`` (metres).

        ``std`` ``[K, 2]`` defaults to :meth:`std`; the update passes it in so that its compiled
        loss (``--compile-update``) reads no exploration schedule. Sum ``log_prob`` and ``entropy``
        over the last two dimensions for per-plan values (:func:`sum_over_waypoints`). Arguments
        are not validated (``validate_args=False``): a NaN mean yields NaN log-probs, which the
        update skips, instead of an exception mid-rollout.
        """
        mean = self.delta_head(z, sft_waypoints)
        std = self.std() if std is None else std
        return Normal(mean, std.expand_as(mean), validate_args=False)

    def value(self, z: Tensor, sft_waypoints: Tensor) -> Tensor:
        """Critic ``[N]``."""
        return self.value_head(z, sft_waypoints)

    @torch.no_grad()
    def act(
        self,
        z: Tensor,
        sft_waypoints: Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Choose a delta for a rollout step (no gradients).

        Returns:
            delta ``[N, K, 2]`` (metres, the raw sample; store it in the buffer and apply it with
            :meth:`final_waypoints`, which clips it), its ``log_prob`` ``[N]`` summed over
            ``K`` and both axes, and ``value`` ``[N]``. With ``deterministic`` the delta is the mean.
            ``generator`` (on the tensors' device) makes sampling reproducible; ``noise`` ``[N, K, 2]``
            (standard normal) replaces the draw.
        """
        dist = self.distribution(z, sft_waypoints)
        if deterministic:
            delta = dist.mean
        else:
            if noise is None:
                noise = torch.randn(dist.mean.shape, generator=generator, device=z.device, dtype=z.dtype)
            delta = dist.mean + dist.stddev * noise
        log_prob = sum_over_waypoints(dist.log_prob(delta))
        return delta, log_prob, self.value(z, sft_waypoints)

    def evaluate_actions(
        self, z: Tensor, sft_waypoints: Tensor, delta: Tensor, std: Tensor | None = None
    ) -> ActionScores:
        """Log-prob, entropy, value and mean delta of stored deltas ``[N, K, 2]``, with gradients
        (``std`` as in :meth:`distribution`)."""
        dist = self.distribution(z, sft_waypoints, std)
        log_prob = sum_over_waypoints(dist.log_prob(delta))
        entropy = sum_over_waypoints(dist.entropy())
        return ActionScores(log_prob, entropy, self.value(z, sft_waypoints), dist.mean)

    def final_waypoints(self, sft_waypoints: Tensor, delta: Tensor) -> Tensor:
        """The plan sent to the world: ``sft_waypoints + clamp(delta, -max_delta, max_delta)``.

        The sampled delta is stored and scored unclipped; only the applied action is clipped
        (CleanRL's convention for continuous actions), so no waypoint ever moves further than
        ``max_delta`` from the SFT plan (``action_bound`` during a bound warm-up). Safety net: a
        world whose delta holds any NaN or inf gets delta 0, i.e. exactly the SFT plan, so a
        diverged policy never reaches the world.
        Shapes ``[N, K, 2]``, metres.
        """
        finite = torch.isfinite(delta).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
        safe_delta = torch.where(finite, delta, torch.zeros_like(delta))
        return sft_waypoints + safe_delta.clamp(-self.action_bound, self.action_bound)

    @torch.no_grad()
    def deterministic_waypoints(self, bev: Tensor, state: Tensor) -> Tensor:
        """Evaluation plan ``[N, K, 2]`` (metres): SFT plan + mean delta (clipped, non-finite -> 0)."""
        z, sft_waypoints = self.features(bev, state)
        return self.final_waypoints(sft_waypoints, self.delta_head(z, sft_waypoints))
