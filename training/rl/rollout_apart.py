"""The rollout of worlds that step apart (``--async-worlds``; an environment with ``asynchronous``).

In :func:`training.rl.trainer.collect_rollout` every step waits for the slowest world. With MetaDrive
a step's cost depends on the scenario and the moment (13-30 ms per policy step), so with two worlds
one of the two cores idles much of the time. Here each world is sent its next plan as soon as its
last step is back, and contributes ``buffer.num_steps`` steps of its own; the rollout waits only for
the last world to finish them.

The result does not depend on timing. Each world is encoded and acted on alone (batch 1, so a CPU
kernel's rounding never depends on which worlds happened to be ready together); the exploration
noise of step ``t`` is drawn for all worlds the first time any world reaches ``t`` (the draws come
in the same order every run); the truncation store and the episode tally are put in step and world
order before they are read; and the environment gives each world its own scenario seeds. The loop
runs on the host (it reads which worlds are back), as a process-per-world simulator does anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.envs.protocol import BatchedWaypointEnv, Observation, StepResult
from training.rl.bootstrap import TruncationStore
from training.rl.buffer import RolloutBuffer
from training.rl.episodes import EpisodeTally
from training.rl.policy import PPOPolicy


class _NoiseRows:
    """The exploration noise ``[N, K, 2]`` of each step, drawn from ``generator`` in step order."""

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> None:
        self.shape, self.generator = shape, generator
        self.device, self.dtype = like.device, like.dtype
        self.steps: list[Tensor] = []

    def row(self, step: int, world: int) -> Tensor:
        while len(self.steps) <= step:
            draw = torch.randn(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)
            self.steps.append(draw)
        return self.steps[step][world : world + 1]


@torch.no_grad()
def collect_rollout_apart(
    policy: PPOPolicy,
    env: BatchedWaypointEnv,
    buffer: RolloutBuffer,
    obs: Observation,
    generator: torch.Generator,
    reward_scale: float,
) -> tuple[Observation, EpisodeTally]:
    """Fill ``buffer`` with ``buffer.num_steps`` steps of every world, each world at its own pace;
    return the next observation and the rollout's episode tally (as ``collect_rollout``)."""
    num_steps, num_envs = buffer.num_steps, env.num_envs
    bev, state = obs.bev.clone(), obs.state.clone()  # each world's latest observation
    encoded = [policy.features(bev[i : i + 1], state[i : i + 1]) for i in range(num_envs)]
    z = torch.cat([features for features, _ in encoded])
    sft_waypoints = torch.cat([plan for _, plan in encoded])
    noise = _NoiseRows(tuple(buffer.delta.shape[1:]), generator, z)
    steps = [0] * num_envs  # steps each world has taken in this rollout
    actions: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # world -> its step's delta, log-prob, value
    truncations = TruncationStore.for_rollout(env, num_steps)
    worlds_tally = EpisodeTally.per_world(env.device, num_envs)

    def send(worlds: list[int]) -> None:
        plans = []
        for i in worlds:
            actions[i] = policy.act(z[i : i + 1], sft_waypoints[i : i + 1], noise=noise.row(steps[i], i))
            plans.append(policy.final_waypoints(sft_waypoints[i : i + 1], actions[i][0]))
        env.send(worlds, torch.cat(plans))

    def record(world: int, row: int, result: StepResult) -> None:
        delta, log_prob, value = actions.pop(world)
        buffer.add(
            steps[world],
            z=z[world],
            sft_waypoints=sft_waypoints[world],
            delta=delta[0],
            log_prob=log_prob[0],
            value=value[0],
            reward=result.reward[row] * reward_scale,
            terminated=result.terminated[row],
            truncated=result.truncated[row],
            world=world,
        )
        if result.truncated[row]:
            final = result.info.final_observation
            truncations.add_world(steps[world], world, final.bev[row], final.state[row])
        bev[world], state[world] = result.obs.bev[row], result.obs.state[row]
        z[world], sft_waypoints[world] = (
            f[0] for f in policy.features(bev[world : world + 1], state[world : world + 1])
        )
        steps[world] += 1

    send(list(range(num_envs)))
    while actions:
        stepped = env.recv()
        result = stepped.result
        worlds_tally.add(result, torch.tensor(stepped.worlds, device=env.device))
        for row, world in enumerate(stepped.worlds):
            record(world, row, result)
        unfinished = [world for world in stepped.worlds if steps[world] < num_steps]
        if unfinished:
            send(unfinished)

    buffer.next_values_from_values(policy.value(z, sft_waypoints))
    truncations.bootstrap(policy, buffer.next_value, by_step=True)
    tally = EpisodeTally.zeros(env.device, num_envs, env.groups)
    tally.absorb(worlds_tally)
    return Observation(bev, state), tally
