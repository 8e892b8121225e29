"""One PPO minibatch: its loss, shared by the eager and the compiled update, and the whole step
compiled (``--compile-update``).

The eager update (``trainer.ppo_update``) computes :func:`minibatch_loss`, calls ``backward``,
clips the gradients and steps Adam: some 300 small operations per minibatch, each paying the
dispatcher's few microseconds, around matrix products that are small themselves. With
``--compile-update`` a single-process run makes the whole step one ``torch.compile`` graph
(:func:`minibatch_step`): the minibatch's rows gathered from the rollout, the loss, its
gradients (``torch.func.grad_and_value``), the clipping, the NaN guard and Adam, with no host
read. A multi-process run compiles the loss only (:func:`compiled_minibatch_loss`), since its
gradients are averaged between processes before the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.optim.adam import adam as functional_adam

from training.common.compiling import with_graph_limit
from training.rl.buffer import Minibatch
from training.rl.distributed import DistContext
from training.rl.losses import ppo_loss, residual_l2_penalty
from training.rl.policy import PPOPolicy

# Graphs one process may compile for the loss (dynamo's default is 8, past which the loss would
# quietly run eagerly): a process that trains several runs (a sweep, the tests) builds more.
_LOSS_GRAPHS_PER_PROCESS = 64


class LossTerms(NamedTuple):
    """What one update's minibatch loss adds up, fixed for the whole update (see :func:`ppo_loss`)."""

    clip_epsilon: float
    value_coef: float
    entropy_coef: float
    normalize_advantages: bool
    value_clip: float | None
    residual_l2_coef: float
    kl_penalty: bool  # add kl_coef x the KL to the SFT reference policy
    critic_only: bool  # warm-up: the policy terms are constants, only the critic learns


class UpdateSettings(NamedTuple):
    """What every minibatch step of one update shares."""

    terms: LossTerms
    kl_coef: float  # weight of the KL to SFT (the adaptive coefficient's value for this update)
    max_grad_norm: float  # global gradient-norm clip (inf: none)
    kl_stop: float | None  # no step, and the update stops, where a minibatch's approx KL exceeds this


class MinibatchStds(NamedTuple):
    """The policy's stds ``[K, 2]`` for one minibatch, computed outside :func:`minibatch_loss`.

    They follow the exploration schedule, a Python number that a compiled loss would otherwise
    have to be recompiled for. The distribution and the KL each get their own ``policy.std()``, as
    the update always computed them: with one shared node their two gradients would be added before
    going back through the std's ``mul``, ``exp`` and ``clamp`` instead of after, which rounds
    differently (eager runs stay bit for bit what they were).
    """

    delta: Tensor  # the rollout policy's std, with gradients to log_std
    kl: Tensor  # the same value, a separate node of the graph
    reference: Tensor  # the SFT reference policy's std (no gradient)


def minibatch_loss(
    policy: PPOPolicy, batch: Minibatch, stds: MinibatchStds, kl_coef: Tensor | float, terms: LossTerms
) -> tuple[Tensor, dict[str, Tensor]]:
    """One minibatch's PPO loss (:func:`ppo_loss`, plus the residual L2 and the KL to SFT) and its
    detached statistics. A pure function of its inputs, so that ``torch.compile`` can take it whole;
    compiled, ``kl_coef`` must be a tensor (a float would be compiled in, one graph per value)."""
    new_log_prob, entropy, new_value, mean_delta = policy.evaluate_actions(
        batch.z, batch.sft_waypoints, batch.delta, stds.delta
    )
    if terms.critic_only:  # the policy terms become constants: only the critic learns
        new_log_prob, entropy = new_log_prob.detach(), entropy.detach()

    loss, stats = ppo_loss(
        new_log_prob,
        batch.log_prob,
        batch.advantage,
        new_value,
        batch.returns,
        entropy,
        clip_epsilon=terms.clip_epsilon,
        value_coef=terms.value_coef,
        entropy_coef=terms.entropy_coef,
        normalize_advantages=terms.normalize_advantages,
        old_value=batch.value,
        value_clip=terms.value_clip,
    )
    residual_l2 = residual_l2_penalty(mean_delta)
    kl_ref = policy.kl_to_sft(mean_delta, stds.kl, stds.reference).mean()
    if not terms.critic_only:
        if terms.residual_l2_coef > 0:
            loss = loss + terms.residual_l2_coef * residual_l2
        if terms.kl_penalty:
            loss = loss + kl_coef * kl_ref
    stats.update(residual_l2=residual_l2.detach(), kl_to_reference=kl_ref.detach())
    return loss, stats


@functools.cache
def compiled_minibatch_loss() -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """:func:`minibatch_loss` as one ``torch.compile`` graph, built once per process: what
    ``--compile-update`` compiles under torchrun, where the gradients are averaged between the
    backward and the step (one process compiles the whole step, :func:`compiled_minibatch_step`).

    A minibatch's loss and backward then issue about 50 top-level aten ops instead of about 260 (the
    heads' matrix products stay; the loss terms' small ops fuse). One graph per minibatch size and
    per set of :class:`LossTerms` (a run has at most a few); what changes between iterations comes
    in as tensors (:class:`MinibatchStds`, the KL coefficient).
    """
    return with_graph_limit(
        torch.compile(minibatch_loss, fullgraph=True, dynamic=False), _LOSS_GRAPHS_PER_PROCESS
    )


# ---------------------------------------------------------------------------------------- the step compiled
class PolicyLoss(nn.Module):
    """:func:`minibatch_loss` as a module call, so that ``torch.func`` can differentiate it with
    respect to parameters passed in (``functional_call`` swaps them into ``policy``)."""

    def __init__(self, policy: PPOPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, batch: Minibatch, noise_scale: Tensor, reference_std: Tensor, kl_coef: Tensor, terms: LossTerms
    ) -> tuple[Tensor, dict[str, Tensor]]:
        std = self.policy.std(noise_scale)
        return minibatch_loss(self.policy, batch, MinibatchStds(std, std, reference_std), kl_coef, terms)


class AdamTensors(NamedTuple):
    """The trained parameters and their Adam state, as tensors that a step updates in place: the
    parameters' storage (detached aliases) and ``torch.optim.Adam``'s own ``state`` tensors, so
    checkpoints and an eager step after a compiled one see every update."""

    params: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    step: list[Tensor]  # 0-d float32, as torch.optim.Adam keeps it


class StepSettings(NamedTuple):
    """What is fixed for a whole update, compiled into the step's graph."""

    terms: LossTerms
    names: tuple[str, ...]  # the trained parameters' names in ``PolicyLoss`` (``params``' order)
    max_grad_norm: float  # inf: no clipping
    kl_stop: float | None  # skip the step when the minibatch's approx KL exceeds this (None: never)
    beta1: float
    beta2: float
    eps: float


class StepInputs(NamedTuple):
    """What changes between minibatches or updates, as tensors (a new value needs no new graph)."""

    index: Tensor  # [B] rows of the flat rollout
    noise_scale: Tensor  # 0-d: the exploration schedule's scale of the stds
    reference_std: Tensor  # [K, 2] the SFT reference policy's std
    kl_coef: Tensor  # 0-d
    lr: Tensor  # 0-d


def minibatch_step(
    loss_of: PolicyLoss, rollout: Minibatch, adam: AdamTensors, inputs: StepInputs, settings: StepSettings
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One whole PPO minibatch step, as the eager update takes it: the loss of the rows
    ``inputs.index`` of ``rollout``, its gradients, a global-norm clip, then ``torch.optim.Adam``'s
    step (without weight decay) in place on ``adam``.

    The step is applied only where the loss and the gradient norm are finite and, with
    ``settings.kl_stop``, the approx KL does not exceed it (compared in double precision, as the
    eager update compares it on the host). Returns whether it was applied and whether the KL
    exceeded the stop (0-d bool tensors: the eager update stops before such a step, the caller
    reads this one and stops after it), and the minibatch's statistics, with ``loss`` and
    ``grad_norm`` (before clipping).
    """
    batch = rollout.rows(inputs.index)

    def loss_and_stats(trained: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = (batch, inputs.noise_scale, inputs.reference_std, inputs.kl_coef, settings.terms)
        return functional_call(loss_of, trained, args, strict=False)

    named_grads, (loss, stats) = grad_and_value(loss_and_stats, has_aux=True)(
        dict(zip(settings.names, adam.params, strict=True))
    )
    grads = [named_grads[name] for name in settings.names]
    # torch.nn.utils.clip_grad_norm_'s arithmetic
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    clip = (settings.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
    kl_exceeded = torch.zeros((), dtype=torch.bool, device=loss.device)
    if settings.kl_stop is not None:
        kl_exceeded = stats["approx_kl"].double() > settings.kl_stop
    applied = torch.isfinite(loss) & torch.isfinite(grad_norm) & ~kl_exceeded
    _adam_where(adam, [g * clip for g in grads], inputs.lr, applied, settings)
    stats.update(loss=loss.detach(), grad_norm=grad_norm)
    return applied, kl_exceeded, stats


def _adam_where(adam: AdamTensors, grads: list[Tensor], lr: Tensor, applied: Tensor, s: StepSettings) -> None:
    """``torch.optim.Adam``'s step (torch's functional form of it, one tensor at a time) on copies
    of ``adam``, kept only where ``applied``: a skipped step leaves the moments and the count too."""
    stepped = AdamTensors(*([tensor.clone() for tensor in tensors] for tensors in adam))
    functional_adam(
        stepped.params, grads, stepped.exp_avg, stepped.exp_avg_sq, [], stepped.step, foreach=False,
        amsgrad=False, beta1=s.beta1, beta2=s.beta2, lr=lr, weight_decay=0.0, eps=s.eps, maximize=False,
    )  # fmt: skip
    for olds, news in zip(adam, stepped, strict=True):
        for old, new in zip(olds, news, strict=True):
            old.copy_(torch.where(applied, new, old))


@functools.cache
def compiled_minibatch_step() -> Callable[..., tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """:func:`minibatch_step` as one ``torch.compile`` graph, built once per process (one graph
    per minibatch size and :class:`StepSettings`)."""
    return with_graph_limit(
        torch.compile(minibatch_step, fullgraph=True, dynamic=False), _LOSS_GRAPHS_PER_PROCESS
    )


def plain_adam(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
    """Whether ``optimizer`` is an Adam over exactly ``params`` whose step :func:`minibatch_step`
    computes (one group, no weight decay, no AMSGrad, not maximising)."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    same_params = [id(p) for p in group["params"]] == [id(p) for p in params]
    return same_params and group["weight_decay"] == 0 and not group["amsgrad"] and not group["maximize"]


class CompiledSteps:
    """The compiled step of every minibatch of one update: its fixed inputs gathered once."""

    def __init__(
        self, policy: PPOPolicy, optimizer: torch.optim.Adam, rollout: Minibatch, update: UpdateSettings
    ) -> None:
        terms = update.terms
        trained = policy.value_head.parameters() if terms.critic_only else policy.trainable_parameters()
        trained = list(trained)  # the warm-up gives the actor no gradient: Adam must not count a step for it
        name_of = {id(p): f"policy.{name}" for name, p in policy.named_parameters()}
        group = optimizer.param_groups[0]
        states = [_adam_state(optimizer, p) for p in trained]
        self.loss_of = PolicyLoss(policy)
        self.rollout = rollout
        self.adam = AdamTensors(
            params=[p.detach() for p in trained],
            exp_avg=[state["exp_avg"] for state in states],
            exp_avg_sq=[state["exp_avg_sq"] for state in states],
            step=[state["step"] for state in states],
        )
        self.settings = StepSettings(
            terms=terms,
            names=tuple(name_of[id(p)] for p in trained),
            max_grad_norm=update.max_grad_norm,
            kl_stop=update.kl_stop,
            beta1=float(group["betas"][0]),
            beta2=float(group["betas"][1]),
            eps=float(group["eps"]),
        )
        device = rollout.z.device
        self.noise_scale = torch.tensor(policy.exploration.noise_scale, device=device)
        self.reference_std = policy.reference_std()
        self.kl_coef = torch.tensor(update.kl_coef, device=device)
        self.lr = torch.tensor(float(group["lr"]), device=device)

    def __call__(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Step on the rollout's rows ``index`` (:func:`minibatch_step`); ``None`` where the KL
        stops the update (the step left everything as it was)."""
        inputs = StepInputs(index, self.noise_scale, self.reference_std, self.kl_coef, self.lr)
        # torch.func differentiates inside the graph whatever the grad mode: none is needed outside it
        with torch.no_grad():
            applied, kl_exceeded, stats = compiled_minibatch_step()(
                self.loss_of, self.rollout, self.adam, inputs, self.settings
            )
        if self.settings.kl_stop is not None and bool(kl_exceeded):
            return None
        return applied, stats


def _adam_state(optimizer: torch.optim.Adam, param: nn.Parameter) -> dict[str, Tensor]:
    """``param``'s Adam state, created as ``torch.optim.Adam`` creates it before its first step."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


# ------------------------------------------------------------------------------ the steps of an update
class EagerSteps:
    """Each minibatch's step as the eager update takes it: the loss (compiled alone under torchrun
    with ``--compile-update``), ``backward``, gradients averaged over processes, the clip, the NaN
    guard, Adam. Two host reads per step: the KL early stop and the guard."""

    def __init__(
        self,
        policy: PPOPolicy,
        optimizer: torch.optim.Optimizer,
        rollout: Minibatch,
        update: UpdateSettings,
        *,
        ctx: DistContext,
        compile_loss: bool,
    ) -> None:
        self.policy = policy
        self.optimizer = optimizer
        self.rollout = rollout
        self.update = update
        self.ctx = ctx
        self.params = policy.trainable_parameters()
        # Compiled: the adaptive KL coefficient is a tensor input, so a new value needs no new graph.
        self.loss_of_minibatch = compiled_minibatch_loss() if compile_loss else minibatch_loss
        self.kl_coef = (
            torch.tensor(update.kl_coef, device=rollout.z.device) if compile_loss else update.kl_coef
        )
        self.reference_std = policy.reference_std()  # no gradient, the same all update

    def __call__(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Step on the rollout's rows ``index``; ``None`` (no step) where the KL stops the update."""
        policy, params, ctx, update = self.policy, self.params, self.ctx, self.update
        batch = self.rollout.rows(index)
        stds = MinibatchStds(policy.std(), policy.std(), self.reference_std)
        loss, stats = self.loss_of_minibatch(policy, batch, stds, self.kl_coef, update.terms)
        if update.kl_stop is not None and ctx.mean(stats["approx_kl"]).item() > update.kl_stop:
            return None

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, update.max_grad_norm)
        # NaN/inf guard: a bad step never reaches the parameters (nor Adam's moments).
        finite = ctx.all_agree(bool(torch.isfinite(loss) & torch.isfinite(grad_norm)))
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        stats.update(loss=loss.detach(), grad_norm=grad_norm.detach())
        return torch.tensor(finite), stats


def minibatch_steps(
    policy: PPOPolicy,
    optimizer: torch.optim.Optimizer,
    rollout: Minibatch,
    update: UpdateSettings,
    *,
    ctx: DistContext,
    compile_update: bool,
) -> Callable[[Tensor], tuple[Tensor, dict[str, Tensor]] | None]:
    """The step an update takes on each minibatch (rows of ``rollout``): the compiled whole step
    with ``compile_update`` in one process with a plain Adam, else the eager one."""
    if compile_update and not ctx.enabled and plain_adam(optimizer, policy.trainable_parameters()):
        return CompiledSteps(policy, optimizer, rollout, update)
    return EagerSteps(policy, optimizer, rollout, update, ctx=ctx, compile_loss=compile_update)
