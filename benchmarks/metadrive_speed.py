"""MetaDrive alone beside the adapter (``--env metadrive``), measured in one run on the same scenarios.

    python -m benchmarks.metadrive_speed [--steps 200] [--episodes 0] [--seconds 0] [--repeats 3] [--seed S]
                                         [--json]

Measurements, all on the adapter's MetaDrive config and on scenario seeds ``seed, seed + 1, ...`` (a
new seed whenever an episode ends, at most ``max_episode_steps`` policy steps each, as in the
adapter). MetaDrive allows one engine per process, so each lives in a process of its own:

- ``adapter_inprocess``: one ``MetaDriveWorld`` driven by its expert's plans (IDM lane choice, local
  route, BEV, expert plan, controller, reward), no worker process in between. The MetaDrive actions
  its controller sends are recorded.
- ``raw``: a bare ``HeadlessMetaDriveEnv`` replaying those recorded actions on the same seeds: the same
  trajectories, so MetaDrive simulates the same traffic. A policy step is 5 MetaDrive decisions.
- ``raw_fixed_action``: the bare env driven straight at a fixed throttle (the issue's first
  measurement), for reference only: MetaDrive triggers its traffic block by block as the ego enters
  them, so an ego that stands or leaves the road within seconds costs MetaDrive less per step.
- ``adapter_inprocess_x2``: two such worlds in two processes at once, each on the same seeds, not
  waiting for each other: what two worlds can get from this machine's cores (its rate counts both).
- ``adapter``: the batched env of ``make_env("metadrive", 1)`` (one world's worker process, and the
  spare that prepares the next scenario while the world steps), driven by the expert plans it returns.
- ``adapter_2workers``: two worlds that step apart (``MetaDriveWaypointEnv(2, asynchronous=True)``, what
  ``--async-worlds`` trains with): each world is sent its next expert plan as soon as its step is back
  and plays its own seeds (world ``i``: ``seed + i``, ``seed + i + 2``, ...); its rate counts the policy
  steps of both worlds.
- ``adapter_2workers_lockstep``: ``make_env("metadrive", 2)``, the worlds stepping together (every step
  waits for the slower world) with the spare: what training without ``--async-worlds`` and the
  evaluations use.
- ``adapter_in_place``, ``adapter_2workers_in_place``: one world and two in lockstep without the spare (a
  finished world resets in its own worker while the others wait).

With ``--episodes N`` every measurement plays scenarios ``seed .. seed + N - 1`` to their end instead of
``--steps`` steps (the batched env counts only those episodes' steps and times until the last of them
ends; raw MetaDrive replays them): one and two worlds then do the same work (in ``--steps`` windows two
worlds cover other scenarios than one, and a scenario's cost per step varies twofold), and two worlds pay
for their tail (worlds that step apart: the world that finishes its share of the scenarios first
idles until the other is done).

Every round runs them all, one after the other, ``--repeats`` rounds; the figures are medians over
rounds, and a ratio is the median of the ratios within a round (on shared cores the load drifts
over minutes). Rates include the episode resets inside the measurement, not worker start-up. Each
measurement also reports the CPU time it used per policy step (its process, plus the workers' for
the batched env), a cost the load moves much less than the rate. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from training.common.cli import require
from training.common.device import set_cpu_threads
from training.common.errors import exit_on_user_error
from training.common.seeds import DEV_SEED_START
from training.envs.metadrive import MetaDriveWaypointEnv
from training.envs.metadrive.config import MetaDriveWorldConfig

FIXED_ACTION = (0.0, 0.3)  # steering, throttle_brake: straight ahead at a moderate throttle


@dataclass(frozen=True)
class SpeedSettings:
    """What one benchmark run measures (the command line)."""

    steps: int  # policy steps per measurement (per world)
    episodes: int  # > 0: the batched env plays these many whole scenarios instead of ``steps`` steps
    seconds: float  # each measurement stops after this long at the latest (0: no limit)
    seed: int  # first scenario seed
    difficulty: float
    repeats: int  # rounds of all measurements; medians are reported

    def out_of_time(self, start: float) -> bool:
        return self.seconds > 0 and time.perf_counter() - start >= self.seconds


# ---------------------------------------------------------------------------------------- entry
MEASUREMENTS = (
    "raw_fixed_action",
    "raw",
    "adapter_inprocess",
    "adapter_inprocess_x2",
    "adapter",
    "adapter_2workers",
    "adapter_2workers_lockstep",
    "adapter_in_place",
    "adapter_2workers_in_place",
)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    settings, as_json = _parse(argv)
    machine = _machine()
    spawn = mp.get_context("spawn")
    rounds: list[dict[str, Any]] = []
    with (
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as world_process,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as second_world_process,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as raw_process,
        _batched(settings, 1) as one_worker,
        _batched(settings, 2, asynchronous=True) as two_apart,
        _batched(settings, 2) as two_workers,
        _batched(settings, 1, spare_world=False) as one_in_place,
        _batched(settings, 2, spare_world=False) as two_in_place,
    ):
        for _ in range(settings.repeats):
            measured = {
                "adapter_inprocess": world_process.submit(measure_adapter_inprocess, settings).result()
            }
            episodes = measured["adapter_inprocess"].pop("episodes")
            measured.update(raw_process.submit(measure_raw, settings, episodes).result())
            side_by_side = [
                p.submit(measure_adapter_inprocess, settings) for p in (world_process, second_world_process)
            ]
            measured["adapter_inprocess_x2"] = _together([future.result() for future in side_by_side])
            measured["adapter"] = measure_batched(settings, one_worker)
            measured["adapter_2workers"] = measure_batched(settings, two_apart)
            measured["adapter_2workers_lockstep"] = measure_batched(settings, two_workers)
            measured["adapter_in_place"] = measure_batched(settings, one_in_place)
            measured["adapter_2workers_in_place"] = measure_batched(settings, two_in_place)
            rounds.append({name: _rates(measured[name]) for name in MEASUREMENTS})
        for process in (world_process, second_world_process, raw_process):
            process.submit(close_process_world).result()
    machine["load_average_end"] = list(os.getloadavg())
    result = _summary(settings, machine, rounds)
    print(json.dumps(result, indent=2) if as_json else _table(result))


def _summary(
    settings: SpeedSettings, machine: dict[str, Any], rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """Medians over rounds of each measurement's figures, and of the ratios taken within a round
    (measurements of one round ran minutes apart at most, under about the same load)."""
    result: dict[str, Any] = {"settings": vars(settings).copy(), "machine": machine}
    for name in MEASUREMENTS:
        for key in rounds[0][name]:
            result[f"{name}_{key}"] = statistics.median(r[name][key] for r in rounds)
    ratios = {
        "adapter_vs_raw": ("adapter", "raw", "policy_steps_per_s"),
        "adapter_inprocess_vs_raw": ("adapter_inprocess", "raw", "policy_steps_per_s"),
        "two_workers_vs_one": ("adapter_2workers", "adapter", "policy_steps_per_s"),
        "two_workers_lockstep_vs_one": ("adapter_2workers_lockstep", "adapter", "policy_steps_per_s"),
        # what two worlds that never wait for each other get from the machine: the ceiling of the above
        "two_inprocess_vs_one": ("adapter_inprocess_x2", "adapter_inprocess", "policy_steps_per_s"),
        "spare_gain_1_world": ("adapter", "adapter_in_place", "policy_steps_per_s"),
        "spare_gain_2_worlds": (
            "adapter_2workers_lockstep",
            "adapter_2workers_in_place",
            "policy_steps_per_s",
        ),
        # CPU cost: raw's CPU per step over the adapter's (1 = the adapter adds nothing)
        "cpu_adapter_vs_raw": ("raw", "adapter", "cpu_ms_per_policy_step"),
    }
    for ratio, (top, bottom, key) in ratios.items():
        per_round = [r[top][key] / r[bottom][key] for r in rounds]
        result[ratio] = statistics.median(per_round)
        result[f"{ratio}_per_round"] = per_round
    result["rounds"] = rounds
    return result


def _parse(argv: list[str] | None) -> tuple[SpeedSettings, bool]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="policy steps per measurement (per world)")
    parser.add_argument(
        "--episodes", type=int, default=0, help="batched env: play these many whole scenarios (0: --steps)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="stop each measurement after this long (0: off)"
    )
    parser.add_argument("--seed", type=int, default=DEV_SEED_START, help="first scenario seed")
    parser.add_argument("--difficulty", type=float, default=MetaDriveWorldConfig().difficulty)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of all measurements (medians reported)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    require(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    require(0.0 <= args.difficulty <= 1.0, f"--difficulty must be in [0, 1], got {args.difficulty}")
    require(args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}")
    require(args.episodes >= 0, f"--episodes must be >= 0, got {args.episodes}")
    settings = SpeedSettings(
        args.steps, args.episodes, max(args.seconds, 0.0), args.seed, args.difficulty, args.repeats
    )
    return settings, args.json


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), model
            )
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def _rates(measured: dict[str, Any]) -> dict[str, float]:
    steps = measured["policy_steps"]
    return {
        "policy_steps_per_s": steps / measured["seconds"],
        "policy_steps": steps,
        "seconds": measured["seconds"],
        "cpu_ms_per_policy_step": 1000.0 * measured["cpu_seconds"] / max(steps, 1),
    }


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _table(result: dict[str, Any]) -> str:
    keys = ("policy_steps_per_s", "policy_steps", "seconds", "cpu_ms_per_policy_step")
    lines = [f"{'measurement':<26} {'policy steps/s':>15} {'steps':>6} {'seconds':>8} {'CPU ms/step':>12}"]
    for name in MEASUREMENTS:
        rate, steps, secs, cpu = (result[f"{name}_{key}"] for key in keys)
        lines.append(f"{name:<26} {rate:>15.2f} {steps:>6.0f} {secs:>8.1f} {cpu:>12.1f}")
    lines.append(
        f"adapter / raw: {result['adapter_vs_raw']:.2f} (CPU cost: {result['cpu_adapter_vs_raw']:.2f})   "
        f"2 workers / 1: {result['two_workers_vs_one']:.2f} (in lockstep: "
        f"{result['two_workers_lockstep_vs_one']:.2f}; two worlds side by side: "
        f"{result['two_inprocess_vs_one']:.2f})   spare: x{result['spare_gain_1_world']:.2f} (1 world), "
        f"x{result['spare_gain_2_worlds']:.2f} (2 worlds)"
    )
    machine = result["machine"]
    lines.append(
        f"{machine['cpu_model']}, {machine['cpu_cores']} cores, load {machine['load_average_start']}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- phases
def _world_config(settings: SpeedSettings) -> MetaDriveWorldConfig:
    return replace(MetaDriveWorldConfig(), difficulty=settings.difficulty)


_PROCESS_WORLD: dict[str, Any] = {}  # the one MetaDrive engine of a measuring process, kept between rounds


def close_process_world() -> None:
    """Close this process's MetaDrive world or env (run in the measuring process)."""
    for name in ("world", "env"):
        if name in _PROCESS_WORLD:
            _PROCESS_WORLD[name].close()
    _PROCESS_WORLD.clear()


def measure_adapter_inprocess(settings: SpeedSettings) -> dict[str, Any]:
    """One ``MetaDriveWorld`` driven by its expert; records every MetaDrive action per episode."""
    from training.envs.metadrive.world import MetaDriveWorld

    set_cpu_threads(1)
    if "world" not in _PROCESS_WORLD:
        _PROCESS_WORLD["world"] = MetaDriveWorld(_world_config(settings))
        _PROCESS_WORLD["metadrive_step"] = _PROCESS_WORLD["world"].env.step
    world, metadrive_step = _PROCESS_WORLD["world"], _PROCESS_WORLD["metadrive_step"]
    episodes: list[tuple[int, list[list[float]]]] = []

    def recording_step(action: list[float]) -> Any:
        episodes[-1][1].append(list(action))
        return metadrive_step(action)

    world.env.step = recording_step
    seed, steps = settings.seed, 0
    episodes.append((seed, []))
    frame = world.reset(seed)  # the first reset is left out of every measurement
    start, cpu_start = time.perf_counter(), time.process_time()
    last_seed = settings.seed + settings.episodes - 1  # with --episodes: whole scenarios up to this one
    while not settings.out_of_time(start) and (settings.episodes or steps < settings.steps):
        outcome = world.step(frame.expert)
        frame, steps = outcome.frame, steps + 1
        if outcome.terminated or outcome.truncated:
            seed += 1
            if settings.episodes and seed > last_seed:
                break
            episodes.append((seed, []))
            frame = world.reset(seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    world.env.step = metadrive_step
    return {
        "policy_steps": steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "episodes": [(s, actions) for s, actions in episodes if actions],
    }


def measure_raw(settings: SpeedSettings, episodes: list[tuple[int, list[list[float]]]]) -> dict[str, Any]:
    """A bare ``HeadlessMetaDriveEnv``: the recorded episodes replayed, then a fixed action."""
    from training.envs.metadrive.headless import HeadlessMetaDriveEnv

    set_cpu_threads(1)
    config = _world_config(settings)
    if "env" not in _PROCESS_WORLD:
        _PROCESS_WORLD["env"] = HeadlessMetaDriveEnv(config.metadrive_config(), config.remove_crossing_lines)
        _PROCESS_WORLD["env"].reset(seed=0)  # the adapter's throw-away first episode (MetaDriveWorld)
    env = _PROCESS_WORLD["env"]
    replay = _replay(env, episodes, config.substeps)
    return {"raw": replay, "raw_fixed_action": _fixed_action(env, settings, config, replay["policy_steps"])}


def _replay(env: Any, episodes: list[tuple[int, list[list[float]]]], substeps: int) -> dict[str, Any]:
    decisions = 0
    env.reset(seed=episodes[0][0])
    start, cpu_start = time.perf_counter(), time.process_time()
    for index, (seed, actions) in enumerate(episodes):
        if index > 0:
            env.reset(seed=seed)
        for action in actions:
            env.step(action)
        decisions += len(actions)
    return {
        "policy_steps": round(decisions / substeps),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def _fixed_action(
    env: Any, settings: SpeedSettings, config: MetaDriveWorldConfig, steps: int
) -> dict[str, Any]:
    seed, done_steps, episode_steps = settings.seed, 0, 0
    env.reset(seed=seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    while done_steps < steps and not settings.out_of_time(start):
        done = False
        for _ in range(config.substeps):
            done = env.step(list(FIXED_ACTION))[2]
            if done:
                break
        done_steps, episode_steps = done_steps + 1, episode_steps + 1
        if done or episode_steps >= config.max_episode_steps:
            seed, episode_steps = seed + 1, 0
            env.reset(seed=seed)
    return {
        "policy_steps": done_steps,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def _together(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Measurements that ran at the same time, as one: every step counted, over the longest wall time."""
    return {
        "policy_steps": sum(m["policy_steps"] for m in measured),
        "seconds": max(m["seconds"] for m in measured),
        "cpu_seconds": sum(m["cpu_seconds"] for m in measured),
    }


@contextlib.contextmanager
def _batched(
    settings: SpeedSettings, num_worlds: int, spare_world: bool = True, asynchronous: bool = False
) -> Iterator[MetaDriveWaypointEnv]:
    """The batched env ``make_env("metadrive", num_worlds)`` builds, on the measurement's config (or the
    same without its spare worker, or with its worlds stepping apart), closed on the way out."""
    set_cpu_threads(1)
    config = _world_config(settings)
    env = MetaDriveWaypointEnv(num_worlds, "cpu", config, spare_world=spare_world, asynchronous=asynchronous)
    try:
        yield env
    finally:
        env.close()


def measure_batched(settings: SpeedSettings, env: MetaDriveWaypointEnv) -> dict[str, Any]:
    """The batched env driven by the expert plans it hands back; counts every world's steps (or, with
    ``settings.episodes``, the steps of those whole scenarios)."""
    env.reset(seed=settings.seed)
    pids = env.worker_pids()
    cpu_start = time.process_time() + sum(_process_cpu_seconds(pid) for pid in pids)
    steps, start = 0, time.perf_counter()
    if env.asynchronous:
        steps = _play_apart(env, settings, start)
    elif settings.episodes:
        steps = _play_scenarios(env, settings.seed, settings.episodes)
    else:
        for _ in range(settings.steps):  # per world, as the in-process measurements
            if settings.out_of_time(start):
                break
            env.step(env.expert_waypoints())
            steps += env.num_envs
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() + sum(_process_cpu_seconds(pid) for pid in pids) - cpu_start
    return {"policy_steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds}


def _play_scenarios(env: MetaDriveWaypointEnv, first_seed: int, count: int) -> int:
    """Step until scenarios ``first_seed .. first_seed + count - 1`` have all ended; their steps."""
    remaining, steps = set(range(first_seed, first_seed + count)), 0
    while remaining:
        episode = env.step(env.expert_waypoints()).info.episode
        for world in episode.done.nonzero().flatten().tolist():
            seed = int(episode.scenario_seed[world])
            if seed in remaining:
                remaining.discard(seed)
                steps += int(episode.length[world])
    return steps


def _play_apart(env: MetaDriveWaypointEnv, settings: SpeedSettings, start: float) -> int:
    """Worlds that step apart, each sent its expert's plan as soon as its step is back: ``settings.steps``
    steps each, or (``settings.episodes``) until the scenarios ``seed .. seed + episodes - 1`` have all
    ended (each world plays its own; one that has finished its share stops). The steps counted."""
    last_seed = settings.seed + settings.episodes - 1
    taken = [0] * env.num_envs

    def wanted(world: int) -> bool:
        if settings.episodes:
            return int(env.scenario_seed[world]) <= last_seed
        return taken[world] < settings.steps and not settings.out_of_time(start)

    def send(worlds: list[int]) -> set[int]:
        worlds = [w for w in worlds if wanted(w)]
        if worlds:
            env.send(worlds, env.expert_waypoints()[worlds])
        return set(worlds)

    in_flight, steps = send(list(range(env.num_envs))), 0
    while in_flight:
        stepped = env.recv()
        episode = stepped.result.info.episode
        for row, world in enumerate(stepped.worlds):
            taken[world] += 1
            if not settings.episodes:
                steps += 1
            elif episode.done[row] and int(episode.scenario_seed[row]) <= last_seed:
                steps += int(episode.length[row])
        in_flight = in_flight.difference(stepped.worlds) | send(stepped.worlds)
    return steps


if __name__ == "__main__":
    main()
