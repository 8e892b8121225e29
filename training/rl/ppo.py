"""The PPO update: a few epochs of minibatch gradient steps on the heads over one rollout."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from training.rl.buffer import RolloutBuffer
from training.rl.distributed import DistContext
from training.rl.losses import explained_variance, ppo_loss, residual_l2_penalty
from training.rl.policy import PPOPolicy


def ppo_update(
    policy: PPOPolicy,
    optimizer: torch.optim.Optimizer,
    buffer: RolloutBuffer,
    *,
    update_epochs: int,
    minibatch_size: int,
    clip_epsilon: float,
    value_coef: float,
    entropy_coef: float,
    max_grad_norm: float | None,
    target_kl: float | None = None,
    normalize_advantages: bool = True,
    value_clip: float | None = None,
    residual_l2_coef: float = 0.0,
    kl_coef: float = 0.0,
    critic_only: bool = False,
    generator: torch.Generator | None = None,
    dist_ctx: DistContext | None = None,
) -> dict[str, float]:
    """Run PPO epochs over ``buffer`` (advantages already computed) and return mean statistics.

    Args:
        policy: the policy; only what ``optimizer`` holds (``policy.trainable_parameters()``) moves.
        optimizer: built from ``policy.trainable_parameters()``.
        buffer: a full rollout on which ``compute_advantages`` has run.
        update_epochs: passes over the rollout.
        minibatch_size: transitions per gradient step.
        clip_epsilon: PPO ratio clip; value_coef, entropy_coef: loss weights.
        max_grad_norm: global gradient-norm clip over the trained parameters (None: no clip).
        target_kl: stop the update at the first minibatch whose approx KL exceeds 1.5 x target_kl
            (checked before its step, as Stable-Baselines3 does; None: never).
        normalize_advantages: normalise advantages per minibatch (CleanRL).
        value_clip: clip the value change to ``+- value_clip`` around the rollout value (None: off).
        residual_l2_coef: weight of the mean squared residual mean (m^2), keeps RL near SFT.
        kl_coef: weight of ``policy.kl_to_sft`` (KL from the SFT reference policy, per plan).
        critic_only: warm-up mode: only the value loss produces gradients (no policy change).
        generator: draws the minibatch order (seeded: deterministic).
        dist_ctx: in a distributed run, gradients are averaged over processes before each step,
            and the KL stop and the NaN guard decide on values reduced over processes.

    Returns:
        Means over the applied minibatch steps of ``loss``, ``policy_loss``, ``value_loss``,
        ``entropy``, ``approx_kl``, ``clip_fraction``, ``grad_norm`` (before clipping),
        ``residual_l2``, ``kl_to_reference``; plus ``explained_variance`` (rollout values vs
        returns), ``std`` (mean delta std, m), ``skipped_updates`` (steps skipped because the loss
        or gradient norm was NaN/inf), ``minibatch_updates``, ``epochs`` and ``early_stopped``.

    Two host syncs per minibatch (the KL early stop and the finiteness check that decides
    whether to step); every statistic is read once at the end.
    """
    ctx = dist_ctx or DistContext()
    policy.train()
    params = policy.trainable_parameters()
    clip_norm = float("inf") if max_grad_norm is None else max_grad_norm

    history: dict[str, list[Tensor]] = defaultdict(list)
    applied: list[bool] = []
    epochs_run = 0
    early_stopped = False

    for _epoch in range(update_epochs):
        epochs_run += 1
        for batch in buffer.minibatches(minibatch_size, generator):
            new_log_prob, entropy, new_value, mean_delta = policy.evaluate_actions(
                batch.z, batch.sft_waypoints, batch.delta
            )
            if critic_only:  # the policy terms become constants: only the critic learns
                new_log_prob, entropy = new_log_prob.detach(), entropy.detach()

            loss, stats = ppo_loss(
                new_log_prob,
                batch.log_prob,
                batch.advantage,
                new_value,
                batch.returns,
                entropy,
                clip_epsilon=clip_epsilon,
                value_coef=value_coef,
                entropy_coef=entropy_coef,
                normalize_advantages=normalize_advantages,
                old_value=batch.value,
                value_clip=value_clip,
            )
            residual_l2 = residual_l2_penalty(mean_delta)
            kl_ref = policy.kl_to_sft(mean_delta).mean()
            if not critic_only:
                if residual_l2_coef > 0:
                    loss = loss + residual_l2_coef * residual_l2
                if kl_coef > 0:
                    loss = loss + kl_coef * kl_ref

            # Approx-KL early stop before the step (Stable-Baselines3): once this minibatch shows the
            # policy has moved more than 1.5 x target_kl from the rollout policy, stop the update.
            if (
                target_kl is not None
                and not critic_only
                and ctx.mean(stats["approx_kl"]).item() > 1.5 * target_kl
            ):
                early_stopped = True
                break

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.average_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            # NaN/inf guard: a bad step never reaches the parameters (nor Adam's moments).
            finite = ctx.all_agree(bool(torch.isfinite(loss) & torch.isfinite(grad_norm)))
            if finite:
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
            applied.append(finite)

            stats.update(
                loss=loss.detach(),
                grad_norm=grad_norm.detach(),
                residual_l2=residual_l2.detach(),
                kl_to_reference=kl_ref.detach(),
            )
            for name, value in stats.items():
                history[name].append(value)
        if early_stopped:
            break

    applied_mask = torch.tensor(applied, dtype=torch.bool)
    result = {name: torch.stack(values).cpu()[applied_mask].mean().item() for name, values in history.items()}
    with torch.no_grad():
        result["explained_variance"] = explained_variance(buffer.value, buffer.returns).item()
        result["std"] = policy.std().mean().item()
    result["skipped_updates"] = float(applied.count(False))
    result["minibatch_updates"] = float(applied.count(True))
    result["epochs"] = float(epochs_run)
    result["early_stopped"] = float(early_stopped)
    return result
