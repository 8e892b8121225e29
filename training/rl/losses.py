"""PPO's loss terms as pure functions of tensors (no module state, no ``.item()``)."""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_EPS = 1e-8  # added to the advantage std before dividing (CleanRL)


def ppo_loss(
    new_log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    new_value: Tensor,
    returns: Tensor,
    entropy: Tensor,
    clip_epsilon: float,
    value_coef: float,
    entropy_coef: float,
    normalize_advantages: bool = True,
    old_value: Tensor | None = None,
    value_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate PPO loss on a minibatch of ``B`` samples (all inputs ``[B]``).

    ``loss = policy_loss - entropy_coef * entropy + value_coef * value_loss`` where

    * ``policy_loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``, with
      ``ratio = exp(new_log_prob - old_log_prob)`` and ``A`` normalised per minibatch when
      ``normalize_advantages`` (and ``B > 1``);
    * ``value_loss = 0.5 * mean((new_value - returns)^2)``, or with ``value_clip`` and
      ``old_value`` the pessimistic max with the value clipped to ``old_value +- value_clip``.

    Returns:
        ``(loss, stats)``; ``stats`` holds detached scalar tensors: ``policy_loss``,
        ``value_loss``, ``entropy``, ``approx_kl`` (``mean((ratio - 1) - log ratio)``, an
        unbiased, non-negative KL(old || new) estimator) and ``clip_fraction`` (share of samples
        with ``|ratio - 1| > clip_epsilon``).
    """
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()

    if normalize_advantages and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + ADVANTAGE_EPS)

    # Clipped surrogate: the pessimistic (larger) of the two negated objectives.
    policy_loss_unclipped = -advantages * ratio
    policy_loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    policy_loss = torch.max(policy_loss_unclipped, policy_loss_clipped).mean()

    value_error = (new_value - returns) ** 2
    if value_clip is not None and old_value is not None:
        clipped_value = old_value + torch.clamp(new_value - old_value, -value_clip, value_clip)
        value_error = torch.max(value_error, (clipped_value - returns) ** 2)
    value_loss = 0.5 * value_error.mean()

    entropy_mean = entropy.mean()
    loss = policy_loss - entropy_coef * entropy_mean + value_coef * value_loss

    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_epsilon).to(ratio.dtype).mean()
    stats = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "entropy": entropy_mean.detach(),
        "approx_kl": approx_kl,
        "clip_fraction": clip_fraction,
    }
    return loss, stats


def residual_l2_penalty(mean_delta: Tensor) -> Tensor:
    """Mean squared residual (m^2) over a batch of mean deltas ``[B, K, 2]`` (ResiP's small L2).

    Add ``residual_l2_coef * residual_l2_penalty(mean)`` to the loss to keep RL near the SFT plan.
    """
    return mean_delta.pow(2).mean()


def kl_to_reference(mean_delta: Tensor, std: Tensor, reference_std: Tensor | float) -> Tensor:
    """``KL(Normal(mean_delta, std) || Normal(0, reference_std))`` per sample ``[B]`` (nats).

    The reference is the SFT policy seen as a Gaussian centred on the SFT plan (delta 0).
    ``mean_delta`` ``[B, K, 2]``, ``std`` and ``reference_std`` (broadcastable, e.g. ``[K, 2]``)
    in metres; summed over waypoints and axes.
    """
    variance_ratio = (std / reference_std) ** 2
    per_coordinate = 0.5 * (variance_ratio + (mean_delta / reference_std) ** 2 - 1.0 - variance_ratio.log())
    return per_coordinate.expand_as(mean_delta).sum(dim=(-2, -1))


def explained_variance(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """``1 - Var(y_true - y_pred) / Var(y_true)`` as a 0-d tensor; NaN when ``Var(y_true) == 0``.

    1 is a perfect critic, 0 no better than predicting the mean, negative worse than that.
    """
    y_pred, y_true = y_pred.flatten(), y_true.flatten()
    var_true = y_true.var(correction=0)
    ratio = (y_true - y_pred).var(correction=0) / var_true
    return torch.where(var_true == 0, torch.full_like(var_true, float("nan")), 1.0 - ratio)
