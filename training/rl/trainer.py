"""The residual PPO loop, top to bottom like CleanRL's ``ppo_continuous_action.py``.

:func:`train_ppo` runs the whole training, :func:`train_iteration` one PPO iteration (rollout,
advantages, update, metrics), :func:`collect_rollout` the rollout and :func:`ppo_update` the update
epochs; the helpers of each step come after them. One iteration can be followed from rollout to
update with this file, ``policy.py`` (heads, distribution, the KL to SFT) and ``losses.py`` (the
loss terms). Next door: ``buffer.py`` (storage and GAE), ``bootstrap.py`` (the truncated
episodes' values, encoded once per rollout), ``cuda_graph.py`` (the rollout step replayed as a
CUDA graph, ``--cuda-graph``), ``run.py`` (the run's state, files, checkpoints and resuming),
``rollout_apart.py`` (the rollout of worlds that step apart, ``--async-worlds``),
``evaluation.py`` (the development evaluation), ``episodes.py`` (the rollout's episode tally) and
``run_log.py`` (metrics files, TensorBoard, console).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from training.common.errors import EXIT_USER_ERROR, UserError
from training.envs.capacity import announce
from training.envs.protocol import BatchedWaypointEnv, Observation, StepResult
from training.rl.bootstrap import TruncationStore
from training.rl.buffer import RolloutBuffer
from training.rl.config import PPOConfig
from training.rl.cuda_graph import StepGraph
from training.rl.distributed import DistContext, init_distributed, shutdown
from training.rl.episodes import EpisodeTally
from training.rl.evaluation import evaluate
from training.rl.losses import explained_variance
from training.rl.minibatch import LossTerms, UpdateSettings, minibatch_steps
from training.rl.policy import Exploration, PPOPolicy
from training.rl.rollout_apart import collect_rollout_apart
from training.rl.run import Run, build_run, latest_checkpoint, resume_from, write_run_config
from training.rl.run_log import RunLog
from training.rl.selection import PolicySelection


# ---------------------------------------------------------------------------------------- the run
def train_ppo(config: PPOConfig) -> dict[str, Any]:
    """Run (or with ``config.resume`` continue) residual PPO; returns the baseline and final evaluations.

    Under ``torchrun`` every process runs this; rank 0 alone evaluates and writes files.
    """
    config.validate()
    ctx = init_distributed(config.device)
    finished = False
    try:
        run = _build_agreed(config, ctx)
        try:
            results = _train(run)
        finally:
            run.env.close()
            for env in run.eval_envs.values():
                env.close()
        finished = True
        return results
    finally:
        shutdown(ctx, finished=finished)


def _train(run: Run) -> dict[str, Any]:
    config, ctx = run.config, run.ctx
    # 1. start fresh (config.json, the SFT baseline as iteration 0) or from the latest checkpoint
    checkpoint = latest_checkpoint(run.out_dir) if config.resume else None
    if config.resume and checkpoint is None and ctx.is_main:
        announce(f"--resume: no checkpoint in {run.out_dir} yet; starting the run")
    ctx.barrier()  # rank 0 has prepared the out-dir
    if checkpoint is None:
        start_fresh(run)
    else:
        resume_from(run, checkpoint)
    log = RunLog(run, resumed=checkpoint is not None)

    # killed between the last checkpoint_iter_N.pt and final.pt: nothing left to train, final.pt to write
    finished_before = checkpoint is not None and run.iteration >= config.num_iterations
    while run.iteration < config.num_iterations:
        run.iteration += 1
        # 2. one PPO iteration; a streak of updates skipped for NaN/inf stops the run
        record = train_iteration(run)
        log.train(record)
        if run.bad_iterations >= config.max_bad_iterations:
            log.close()
            kept = (
                f"the last good checkpoint in {run.out_dir} is kept"
                if latest_checkpoint(run.out_dir) is not None
                else "no checkpoint was written yet"
            )
            raise TrainingDiverged(
                f"{run.bad_iterations} updates in a row were skipped for NaN/inf "
                f"(iteration {run.iteration}); stopped, {kept}"
            )
        # 3. evaluation on the development scenarios, offered to the selection of final.pt
        last = run.iteration == config.num_iterations
        if ctx.is_main and ((config.eval_every and run.iteration % config.eval_every == 0) or last):
            log.eval(evaluate_and_select(run))
        # 4. checkpoints: every --save-every iterations and the last, which writes final.pt too
        if last:
            _check_in_sync(run)
        if (config.save_every and run.iteration % config.save_every == 0) or last:
            state = run.state()  # one (collective) snapshot for both files of the last iteration
            run.save(f"checkpoint_iter_{run.iteration}.pt", state)  # the last iteration, resumable
            if last:
                run.save_final(state)
        log.iteration_done(record)
    if finished_before:
        run.save_final()
    log.close()
    return _results(run)


# ---------------------------------------------------------------------------------------- one iteration
def train_iteration(run: Run) -> dict[str, Any]:
    """One PPO iteration: rollout, advantages, update (skipped on non-finite inputs), metrics."""
    config, iteration = run.config, run.iteration
    started = time.perf_counter()
    if config.anneal_lr:
        run.optimizer.param_groups[0]["lr"] = config.lr * (1.0 - (iteration - 1) / config.num_iterations)
    scale = exploration_scale(config, iteration)
    run.policy.exploration = Exploration(scale, scale if config.warmup_bound else 1.0)

    # 1. rollout with the current policy (every process its own worlds), tallies summed over processes
    run.obs, tally = collect_rollout(
        run.policy,
        run.env,
        run.buffer,
        run.obs,
        run.sample_gen,
        config.reward_scale,
        cuda_graph=config.cuda_graph,
    )
    tally.all_reduce(run.ctx)
    run.env_steps += run.ctx.world_size * config.num_envs * config.rollout_steps
    episodes = tally.means()

    # 2. advantages (GAE; bootstraps through truncation, never through termination)
    stats: dict[str, Any] = {}
    critic_only = iteration <= config.critic_warmup_iterations
    if episodes["nonfinite_inputs"] == 0:
        run.buffer.compute_advantages(config.gamma, config.gae_lambda)
        stats = update_policy(run, critic_only=critic_only)  # 3. PPO epochs on the cached features
    healthy = bool(stats) and stats["minibatch_updates"] > 0
    run.bad_iterations = 0 if healthy else run.bad_iterations + 1

    # 4. how far the policy now is from SFT; adapt the KL coefficient and the curriculum
    record = {"iteration": iteration, "env_steps": run.env_steps, **stats, **episodes}
    record |= residual_stats(run)
    record["kl_coef"] = run.kl_coef
    if config.kl_target is not None and healthy and not critic_only:  # the KL is 0 until the actor moves
        run.kl_coef = adapt_kl_coef(run.kl_coef, record["kl_to_sft"], config.kl_target)
    record |= _advance_curriculum(run, episodes)

    # 5. the iteration's record
    elapsed = time.perf_counter() - started
    record["update_skipped"] = not healthy
    record["exploration_scale"] = scale
    record["steps_per_s"] = run.ctx.world_size * config.num_envs * config.rollout_steps / elapsed
    record["lr"] = run.optimizer.param_groups[0]["lr"]
    record["world_size"] = run.ctx.world_size
    return record


def update_policy(run: Run, *, critic_only: bool) -> dict[str, float]:
    """:func:`ppo_update` on the run's buffer (advantages computed) with the run's settings."""
    config = run.config
    return ppo_update(
        run.policy,
        run.optimizer,
        run.buffer,
        update_epochs=config.update_epochs,
        minibatch_size=config.batch_size,
        clip_epsilon=config.clip_epsilon,
        value_coef=config.value_coef,
        entropy_coef=config.entropy_coef,
        max_grad_norm=config.max_grad_norm,
        target_kl=config.target_kl,
        residual_l2_coef=config.residual_l2_coef,
        kl_coef=run.kl_coef,
        critic_only=critic_only,
        generator=run.batch_gen,
        dist_ctx=run.ctx,
        compile_loss=config.compile_update,
    )


# ---------------------------------------------------------------------------------------- the rollout
@torch.no_grad()
def collect_rollout(
    policy: PPOPolicy,
    env: BatchedWaypointEnv,
    buffer: RolloutBuffer,
    obs: Observation,
    generator: torch.Generator,
    reward_scale: float,
    *,
    cuda_graph: bool = False,
) -> tuple[Observation, EpisodeTally]:
    """Fill ``buffer`` with ``buffer.num_steps`` steps of every world; return the next observation.

    One step (``rollout_step``) reads and writes the same tensors at every step and reads nothing
    back to the host, on every device, so that ``cuda_graph`` can replay it as a CUDA graph
    (``cuda_graph.StepGraph``; CUDA worlds only). Non-finite rewards and observations are counted
    in ``tally.nonfinite``; the caller skips the update when any appeared. The truncated episodes'
    final observations are encoded once, after the last step (``bootstrap.TruncationStore``), and
    each step's ``V(next observation)`` is the next step's value (one value pass per step).

    Worlds that step apart (``env.asynchronous``) are rolled out by ``rollout_apart.py`` instead,
    each at its own pace (no CUDA graph: their simulators step on the host).
    """
    if env.asynchronous:
        return collect_rollout_apart(policy, env, buffer, obs, generator, reward_scale)
    tally = EpisodeTally.zeros(env.device, env.num_envs, env.groups)
    truncations = TruncationStore.for_rollout(env, buffer.num_steps)
    z, sft_waypoints = (features.clone() for features in policy.features(obs.bev, obs.state))
    step = torch.zeros((), dtype=torch.int64, device=env.device)  # the buffer row, counted on the device

    def rollout_step() -> StepResult:
        delta, log_prob, value = policy.act(z, sft_waypoints, generator=generator)
        result = env.step(policy.final_waypoints(sft_waypoints, delta))
        next_z, next_sft = policy.features(result.obs.bev, result.obs.state)
        buffer.add(
            step,
            z=z,
            sft_waypoints=sft_waypoints,
            delta=delta,
            log_prob=log_prob,
            value=value,
            reward=result.reward * reward_scale,
            terminated=result.terminated,
            truncated=result.truncated,
        )
        truncations.add(step, result.truncated, result.info.final_observation)
        tally.add(result)
        z.copy_(next_z)
        sft_waypoints.copy_(next_sft)
        step.add_(1)
        return result

    run_step = StepGraph(rollout_step, env, generator) if cuda_graph else rollout_step
    for _ in range(buffer.num_steps):
        result = run_step()
    # V(obs[t + 1]) is step t + 1's value, computed by its act; the last step's is computed here.
    buffer.next_values_from_values(policy.value(z, sft_waypoints))
    # GAE bootstraps a truncated episode from V(its final observation): encoded now, in one pass.
    # Each step's truncated worlds are encoded together on the CPU, the batches the per-step pass
    # encoded, which keeps CPU runs bit for bit as they were (see bootstrap.TruncationStore).
    truncations.bootstrap(policy, buffer.next_value, by_step=env.device.type == "cpu")
    return result.obs, tally


# ---------------------------------------------------------------------------------------- the update
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
    compile_loss: bool = False,
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
        compile_loss: ``--compile-update``: each minibatch's whole step (loss, gradients, clip,
            NaN guard, Adam) as one compiled graph; under torchrun the loss (and so its backward)
            only (``minibatch.py``). The same terms, rounded differently.

    Returns:
        Means over the applied minibatch steps of ``loss``, ``policy_loss``, ``value_loss``,
        ``entropy``, ``approx_kl``, ``clip_fraction``, ``grad_norm`` (before clipping),
        ``residual_l2``, ``kl_to_reference``; plus ``explained_variance`` (rollout values vs
        returns), ``std`` (mean delta std, m), ``skipped_updates`` (steps skipped because the loss
        or gradient norm was NaN/inf), ``minibatch_updates``, ``epochs`` and ``early_stopped``.

    Eager (and under torchrun): two host reads per minibatch (the KL early stop and the
    finiteness check that decides whether to step). The compiled whole step: one with a KL
    target, none without. Every statistic is read once at the end.
    """
    policy.train()
    terms = LossTerms(
        clip_epsilon=clip_epsilon,
        value_coef=value_coef,
        entropy_coef=entropy_coef,
        normalize_advantages=normalize_advantages,
        value_clip=value_clip,
        residual_l2_coef=residual_l2_coef,
        kl_penalty=kl_coef > 0,
        critic_only=critic_only,
    )
    update = UpdateSettings(
        terms,
        kl_coef=kl_coef,
        max_grad_norm=float("inf") if max_grad_norm is None else max_grad_norm,
        # Approx-KL early stop before the step (Stable-Baselines3): once a minibatch shows the
        # policy has moved more than 1.5 x target_kl from the rollout policy, stop the update.
        kl_stop=None if target_kl is None or critic_only else 1.5 * target_kl,
    )
    ctx = dist_ctx or DistContext()
    step = minibatch_steps(policy, optimizer, buffer.flat(), update, ctx=ctx, compile_update=compile_loss)

    history: dict[str, list[Tensor]] = defaultdict(list)
    applied: list[Tensor] = []  # per minibatch step: whether the NaN guard let it through (0-d bool)
    epochs_run = 0
    early_stopped = False
    for _epoch in range(update_epochs):
        epochs_run += 1
        for index in buffer.minibatch_indices(minibatch_size, generator):
            outcome = step(index)
            if outcome is None:  # the KL early stop: this minibatch was not stepped
                early_stopped = True
                break
            applied.append(outcome[0])
            for name, value in outcome[1].items():
                history[name].append(value)
        if early_stopped:
            break

    applied_mask = torch.stack(applied).cpu() if applied else torch.zeros(0, dtype=torch.bool)
    result = {name: torch.stack(values).cpu()[applied_mask].mean().item() for name, values in history.items()}
    with torch.no_grad():
        result["explained_variance"] = explained_variance(buffer.value, buffer.returns).item()
        result["std"] = policy.std().mean().item()
    steps_applied = int(applied_mask.sum())
    result["skipped_updates"] = float(len(applied) - steps_applied)
    result["minibatch_updates"] = float(steps_applied)
    result["epochs"] = float(epochs_run)
    result["early_stopped"] = float(early_stopped)
    return result


# ---------------------------------------------------------------------------------------- run helpers
def _build_agreed(config: PPOConfig, ctx: DistContext) -> Run:
    """``build_run`` on every process; if one fails, all stop instead of waiting for it.

    A failing process reports its own one-line error; rank 0, if it did not fail, says that
    another did; the other ranks exit quietly with code 2.
    """
    error: UserError | None = None
    try:
        run = build_run(config, ctx)
    except UserError as failure:
        error = failure
    if not ctx.all_agree(error is None):
        if error is not None:
            raise error
        if ctx.is_main:
            raise UserError("another process of this distributed run failed to start (see its message)")
        raise SystemExit(EXIT_USER_ERROR)
    return run


def start_fresh(run: Run) -> None:
    """Write ``config.json``, evaluate the SFT baseline (iteration 0) and reset the worlds."""
    if run.ctx.is_main:
        write_run_config(run)
        record, sft_step_ade = evaluate(run.policy, run.eval_envs, run.config, 0, 0)
        run.eval_records = [record]
        run.selection = PolicySelection.start(record, run.policy.heads_state_dict(), sft_step_ade)
    run.obs = run.env.reset(seed=run.train_seed_start)


class TrainingDiverged(UserError):
    """Updates kept meeting non-finite values; the run stops and keeps its last good checkpoint."""


def evaluate_and_select(run: Run) -> dict[str, Any]:
    """Evaluate on the development scenarios and offer the policy to the selection (rank 0)."""
    sft_step_ade = run.selection.sft_step_ade if run.selection is not None else {}
    record, _ = evaluate(run.policy, run.eval_envs, run.config, run.iteration, run.env_steps, sft_step_ade)
    if run.selection is not None:
        run.selection.consider(run.iteration, record, run.policy.heads_state_dict())
        record["selected_iteration"] = run.selection.iteration
    return record


def _check_in_sync(run: Run) -> None:
    """A distributed run's processes must end with identical heads (gradients were averaged)."""
    if not run.ctx.parameters_in_sync(run.policy.trainable_parameters()):
        raise RuntimeError(
            "distributed PPO: the processes' policy parameters differ; gradients were not averaged"
        )


def _results(run: Run) -> dict[str, Any]:
    """What ``train_ppo`` returns: rank 0 the baseline, the last and the selected evaluation."""
    if not run.ctx.is_main:
        return {"out_dir": str(run.out_dir), "policy": run.policy, "rank": run.ctx.rank}
    chosen = run.final_choice
    return {
        "out_dir": str(run.out_dir),
        "baseline": run.eval_records[0],
        "final": run.eval_records[-1],
        "selected_iteration": chosen.iteration if chosen else run.iteration,
        "selected": chosen.record if chosen else run.eval_records[-1],
        "policy": run.policy,
    }


# ---------------------------------------------------------------------------------------- iteration helpers
def exploration_scale(config: PPOConfig, iteration: int) -> float:
    """Progressive exploration: the residual's noise scale at ``iteration`` (1-based).

    Grows linearly from ``--exploration-start-scale`` at the first iteration to 1 at iteration
    ``--exploration-warmup-iterations + 1`` (ResiP and Policy Decorator let the residual explore
    gradually, so the early, still-untrained residual does not wreck the SFT policy's driving).
    """
    warmup = config.exploration_warmup_iterations
    if warmup == 0:
        return 1.0
    progress = min(1.0, (iteration - 1) / warmup)
    return config.exploration_start_scale + (1.0 - config.exploration_start_scale) * progress


def residual_stats(run: Run) -> dict[str, float]:
    """Over the rollout's states, after the update: the mean residual per waypoint (``delta_norm``,
    m) and the mean KL from the SFT reference policy per plan (``kl_to_sft``, nats: the policy's
    own :meth:`~PPOPolicy.kl_to_sft`, as the update penalises it), averaged over processes so that
    the adaptive KL coefficient stays the same on every one."""
    policy = run.policy
    with torch.no_grad():
        z = run.buffer.z.flatten(0, 1)
        sft = run.buffer.sft_waypoints.flatten(0, 1)
        mean_delta = policy.delta_head(z, sft)
        values = torch.stack([mean_delta.norm(dim=-1).mean(), policy.kl_to_sft(mean_delta).mean()])
        delta_norm, kl = run.ctx.mean(values).tolist()
    return {"delta_norm": delta_norm, "kl_to_sft": kl}


KL_COEF_MIN, KL_COEF_MAX = 1e-6, 1e3  # bounds of the adaptive KL coefficient


def adapt_kl_coef(kl_coef: float, measured_kl: float, kl_target: float) -> float:
    """The adaptive KL penalty of Schulman et al. (2017), section 4: double the coefficient when
    the KL overshoots 1.5 x target, halve it when it undershoots target / 1.5."""
    if measured_kl > 1.5 * kl_target:
        return min(kl_coef * 2.0, KL_COEF_MAX)
    if measured_kl < kl_target / 1.5:
        return max(kl_coef / 2.0, KL_COEF_MIN)
    return kl_coef


def _advance_curriculum(run: Run, episodes: dict[str, Any]) -> dict[str, Any]:
    """Record this rollout's episodes at the current level; raise the level when they pass the bar.

    Returns the level the rollout ran at (``curriculum_level``, 0 without a curriculum) and its
    ``difficulty``.
    """
    if run.curriculum is None:
        return {"curriculum_level": 0, "difficulty": run.config.difficulty}
    level = {"curriculum_level": run.curriculum.level, "difficulty": run.curriculum.difficulty}
    if run.curriculum.record(episodes["episodes"], episodes["goals"]):
        run.env.set_difficulty(run.curriculum.difficulty)
    return level
