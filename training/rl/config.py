"""``PPOConfig``: every setting of a residual PPO run; the command line is generated from it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from eval.closed_loop import MAX_WORLDS
from training.common.cli import config_field, require
from training.common.compiling import check_compile_update
from training.common.device import resolve_device
from training.common.errors import UserError
from training.common.seeds import DEV_SEED_START, RL_TRAIN_SEED_START, TEST_SEED_START
from training.envs.capacity import announce, describe, is_process_backed, machine_capacity
from training.envs.options import EnvOptions, SimulatorFlags
from training.envs.registry import check_compile_world, split_env_mix
from training.envs.toy.config import REWARD_PRESETS
from training.rl.policy import PolicySettings
from training.sft.external import parse_factory_spec

# Training scenario seeds are ``TRAIN_SEED_START + seed * TRAIN_SEEDS_PER_RUN + k``; the in-training
# evaluation reads the development range; the test range is left to final comparisons
# (``training/common/seeds.py`` names every range).
TRAIN_SEEDS_PER_RUN = 1_000_000
TRAIN_SEED_START = RL_TRAIN_SEED_START
EVAL_SEED_START = DEV_SEED_START


TOY_NUM_ENVS = 32  # the toy world's rollout worlds (one tensor batch: free)


def _largest_fitting_mix(env: str, weights: str | None, per_simulator: int) -> int:
    """The most worlds, up to ``TOY_NUM_ENVS``, whose share of each process-backed environment fits."""
    for total in range(TOY_NUM_ENVS, 0, -1):
        try:
            mix = split_env_mix(env, weights, total)
        except UserError:  # a malformed mix: validate() reports it with the default size
            return TOY_NUM_ENVS
        if all(count <= per_simulator for name, count in mix if is_process_backed([name])):
            return total
    return 1


# Below this the exploration std of a warm-up is too small to learn from (and underflows towards 0).
MIN_EXPLORATION_SCALE = 1e-3


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _policy_flag(name: str) -> Any:
    """``PPOConfig``'s field for the policy setting ``name``, with the default and help of
    ``PolicySettings`` (a config field of its own would be a second home for them)."""
    setting = {field.name: field for field in dataclasses.fields(PolicySettings)}[name]
    return dataclasses.field(default=setting.default, metadata=setting.metadata)


@dataclass
class PPOConfig(SimulatorFlags):
    """Residual delta-waypoint PPO on top of a frozen SFT model."""

    sft_checkpoint: str = config_field(
        dataclasses.MISSING,
        "SFT model to refine (frozen): this project's model.pt, a torch.export .pt2 or TorchScript file "
        "whose forward returns (z, waypoints), or with --sft-model a state_dict",
    )
    sft_model: str | None = config_field(
        None,
        "your own SFT architecture: FACTORY() in MODULE returns the nn.Module and --sft-checkpoint is "
        "its state_dict (see README, 'Use your own model')",
        metavar="MODULE:FACTORY",
    )
    out_dir: str = config_field("out/rl_delta_ppo_v0", "folder for config, metrics, checkpoints, TensorBoard")
    env: str = config_field(
        "toy", "environment: toy, metadrive or carla; a mix trains on several, e.g. toy,metadrive"
    )
    num_iterations: int = config_field(100, "PPO iterations (one rollout + one update each)")
    batch_size: int = config_field(64, "PPO minibatch size", "transitions")
    lr: float = config_field(3e-4, "Adam learning rate of the heads and log std")
    clip_epsilon: float = config_field(0.2, "PPO ratio clip range")
    value_coef: float = config_field(0.5, "value loss weight")
    entropy_coef: float = config_field(0.01, "entropy bonus weight (per plan, summed over waypoints)")
    gamma: float = config_field(0.99, "discount factor per policy step")
    gae_lambda: float = config_field(0.95, "GAE lambda")
    num_envs: int = config_field(
        TOY_NUM_ENVS,
        "parallel worlds in the rollout (with a simulator that runs a process per world and --sim-workers 0, "
        "this default is lowered to what the machine runs well)",
    )
    rollout_steps: int = config_field(32, "policy steps per world per rollout", "steps")
    update_epochs: int = config_field(10, "passes over each rollout")
    max_grad_norm: float = config_field(0.5, "global gradient-norm clip")
    target_kl: float | None = config_field(
        0.05, "stop an update's epochs once approx KL exceeds 1.5x this (none: off)"
    )
    # the policy's settings: default and help from PolicySettings, their one home
    max_delta: float = _policy_flag("max_delta")
    init_log_std: float = _policy_flag("init_log_std")
    std_horizon_exponent: float = _policy_flag("std_horizon_exponent")
    min_log_std: float = _policy_flag("min_log_std")
    max_log_std: float = _policy_flag("max_log_std")
    action_scale: float = _policy_flag("action_scale")
    hidden_size: int = _policy_flag("hidden_size")
    residual_l2_coef: float = config_field(0.01, "L2 penalty on the mean residual (ResiP)", "1/m^2")
    kl_coef: float = config_field(
        1.0, "weight of the KL from the SFT reference policy (a Gaussian on the SFT plan); 0: off"
    )
    kl_target: float | None = config_field(
        0.4,
        "adapt --kl-coef after each iteration to steer the measured KL to SFT to this (nats/plan; "
        "none: a fixed --kl-coef)",
    )
    exploration_warmup_iterations: int = config_field(
        0, "grow the residual's noise from --exploration-start-scale to full over these iterations (0: off)"
    )
    exploration_start_scale: float = config_field(0.2, "noise (and bound) scale at the first iteration")
    warmup_bound: bool = config_field(False, "grow the residual bound --max-delta on the same schedule")
    curriculum: bool = config_field(
        False, "start easy and raise the difficulty toward --difficulty as the success rate passes a bar"
    )
    curriculum_start: float = config_field(0.0, "difficulty of the curriculum's first level")
    curriculum_step: float = config_field(0.25, "difficulty added per curriculum level")
    curriculum_threshold: float = config_field(0.8, "success rate (goal reached) that raises the level")
    curriculum_min_episodes: int = config_field(64, "training episodes at a level before it may rise")
    env_weights: str | None = config_field(
        None, "with --env a,b: the share of worlds per environment, e.g. 3,1 (default: equal)"
    )
    reward: str = config_field(
        "shaped",
        "reward: shaped (progress, speed, lane keeping, plan terms, comfort, infractions), progress "
        "(route progress and infractions only) or comfort (progress plus the jerk and steering-rate terms)",
    )
    collision_penalty: float | None = config_field(
        None, "reward lost for a collision (default: the environment's, 10 in every one here)"
    )
    off_road_penalty: float | None = config_field(
        None, "reward lost for leaving the road (default: the environment's, 10 in every one here)"
    )
    reward_scale: float = config_field(0.1, "rewards are multiplied by this before GAE")
    critic_warmup_iterations: int = config_field(2, "first iterations train only the value head")
    anneal_lr: bool = config_field(True, "linearly anneal the learning rate to 0")
    difficulty: float = config_field(0.5, "toy world difficulty in [0, 1] (curvature, traffic)")
    eval_every: int = config_field(10, "evaluate every N iterations (0: only at start and end)")
    eval_episodes: int = config_field(50, "held-out scenarios per evaluation", "episodes")
    eval_worlds: int | None = config_field(
        None,
        "worlds that play them, each going on to the next scenario when its episode ends "
        f"(default: one per episode up to {MAX_WORLDS}; with a simulator that runs a process per world, "
        "as many as the machine runs well)",
    )
    eval_seed: int = config_field(
        EVAL_SEED_START, "first evaluation scenario seed (development range; the test range is reserved)"
    )
    select_policy: bool = config_field(
        True,
        "final.pt holds the evaluated policy (iteration 0, the SFT policy itself, included) that is "
        "safest on the development scenarios without being worse than SFT on collision + off-road, "
        "route completion, ADE or jerk; --no-select-policy: the last iteration's",
    )
    save_every: int = config_field(25, "write checkpoint_iter_X.pt every N iterations (0: off)")
    device: str = config_field("auto", "auto, cpu, cuda or cuda:N")
    cuda_graph: bool = config_field(
        False,
        "replay each rollout step as a CUDA graph (CUDA and --env toy only; the capture is not yet tested "
        "on a GPU, see docs/benchmarks.md)",
    )
    compile_world: bool = config_field(
        False,
        "toy world: run each training world step as one torch.compile graph (about 20 ops instead of "
        "about 1,000; about 35 s to compile on a 2-core CPU; CPU only, not yet run on a GPU; observations "
        "within the tolerance of docs/benchmarks.md; evaluation worlds stay eager)",
    )
    compile_update: bool = config_field(
        False,
        "take each PPO minibatch's whole step (loss, gradients, clip, NaN guard, Adam) as one torch.compile "
        "graph, under torchrun the loss and its backward (updates 1.3-1.5x and training 1.1-1.3x faster on "
        "a 2-core CPU, after about 30 s of compiling; the same step rounded differently, so runs differ "
        "from eager ones; CPU only, not yet run on a GPU)",
    )
    async_worlds: bool = config_field(
        False,
        "--env metadrive: the training worlds step apart, none waiting for a slower one (each world "
        "contributes --rollout-steps steps to a rollout and plays its own seeds: seed + i, + N, + 2N, ...; "
        "no spare worker; evaluation worlds still step together)",
    )
    num_threads: int = config_field(
        1, "torch CPU threads (the world's many small ops run fastest on 1; 0: torch's default)"
    )
    seed: int = config_field(0, "run seed: network init, sampling, training scenarios")
    overwrite: bool = config_field(False, "replace a run already in --out-dir")
    resume: bool = config_field(False, "continue the run in --out-dir from its latest checkpoint")
    max_bad_iterations: int = config_field(3, "stop after this many updates in a row skipped for NaN/inf")
    progress: bool = config_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        self._size_worlds_for_the_machine()

    def _size_worlds_for_the_machine(self) -> None:
        """With a simulator that runs a process per world, lower ``num_envs`` left at the toy world's
        default and fill ``eval_worlds`` left unset to what this machine runs well (training and
        evaluation worlds are alive together), and say so in one line. ``--sim-workers N`` asks for
        N processes explicitly: then ``--num-envs`` is obeyed as given."""
        if not is_process_backed([name.strip() for name in self.env.split(",")]):
            return
        fit_training = self.num_envs == TOY_NUM_ENVS and self.sim_workers == 0
        if not fit_training and self.eval_worlds is not None:
            return
        capacity = machine_capacity()
        per_group = capacity.worlds(concurrent_groups=2)
        chosen = []
        if fit_training:
            self.num_envs = _largest_fitting_mix(self.env, self.env_weights, per_group)
            chosen.append(f"--num-envs {self.num_envs}")
        if self.eval_worlds is None:
            self.eval_worlds = per_group
            chosen.append(f"--eval-worlds {self.eval_worlds}")
        announce(
            f"--env {self.env}: {' and '.join(chosen)} (one process per simulator world) to fit this machine "
            f"({describe(capacity)}); --sim-workers and --eval-worlds ask for more"
        )

    def validate(self) -> None:
        """Reject values no run could use, with one line naming the flag."""
        if self.sft_model is not None:
            parse_factory_spec(self.sft_model)
        require(self.num_iterations >= 1, f"--num-iterations must be >= 1, got {self.num_iterations}")
        require(
            self.batch_size >= 2,
            f"--batch-size must be >= 2 (advantages are normalised per minibatch), got {self.batch_size}",
        )
        require(self.num_envs >= 1, f"--num-envs must be >= 1, got {self.num_envs}")
        require(self.rollout_steps >= 1, f"--rollout-steps must be >= 1, got {self.rollout_steps}")
        rollout = self.num_envs * self.rollout_steps
        require(
            self.batch_size <= rollout,
            f"--batch-size {self.batch_size} is larger than a rollout "
            f"(--num-envs {self.num_envs} x --rollout-steps {self.rollout_steps} = {rollout})",
        )
        require(_positive(self.lr), f"--lr must be > 0, got {self.lr}")
        require(
            _positive(self.clip_epsilon) and self.clip_epsilon < 1,
            f"--clip-epsilon must be in (0, 1) (the ratio is clipped to 1 -/+ it), got {self.clip_epsilon}",
        )
        require(0.0 <= self.gamma <= 1.0, f"--gamma must be in [0, 1], got {self.gamma}")
        require(0.0 <= self.gae_lambda <= 1.0, f"--gae-lambda must be in [0, 1], got {self.gae_lambda}")
        require(_non_negative(self.value_coef), f"--value-coef must be >= 0, got {self.value_coef}")
        require(_non_negative(self.entropy_coef), f"--entropy-coef must be >= 0, got {self.entropy_coef}")
        require(self.update_epochs >= 1, f"--update-epochs must be >= 1, got {self.update_epochs}")
        require(_positive(self.max_grad_norm), f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        require(
            self.target_kl is None or _positive(self.target_kl),
            f"--target-kl must be > 0, got {self.target_kl}",
        )
        require(_positive(self.max_delta), f"--max-delta must be > 0 metres, got {self.max_delta}")
        require(_non_negative(self.std_horizon_exponent), "--std-horizon-exponent must be >= 0")
        require(
            math.isfinite(self.init_log_std + self.min_log_std + self.max_log_std),
            "--init-log-std, --min-log-std and --max-log-std must be finite",
        )
        require(self.min_log_std < self.max_log_std, "--min-log-std must be below --max-log-std")
        require(_positive(self.action_scale), f"--action-scale must be > 0, got {self.action_scale}")
        require(self.num_threads >= 0, f"--num-threads must be >= 0, got {self.num_threads}")
        require(self.hidden_size >= 1, f"--hidden-size must be >= 1, got {self.hidden_size}")
        require(_non_negative(self.residual_l2_coef), "--residual-l2-coef must be >= 0")
        require(
            self.reward in REWARD_PRESETS,
            f"--reward must be one of {', '.join(REWARD_PRESETS)}, got {self.reward!r}",
        )
        for flag, value in (
            ("--collision-penalty", self.collision_penalty),
            ("--off-road-penalty", self.off_road_penalty),
        ):
            require(value is None or _non_negative(value), f"{flag} must be >= 0, got {value}")
        require(_positive(self.reward_scale), f"--reward-scale must be > 0, got {self.reward_scale}")
        require(self.critic_warmup_iterations >= 0, "--critic-warmup-iterations must be >= 0")
        require(0.0 <= self.difficulty <= 1.0, f"--difficulty must be in [0, 1], got {self.difficulty}")
        require(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        require(self.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {self.eval_episodes}")
        require(self.eval_worlds is None or self.eval_worlds >= 1, "--eval-worlds must be >= 1")
        require(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        require(self.max_bad_iterations >= 1, "--max-bad-iterations must be >= 1")
        require(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        require(
            0 <= self.seed < (EVAL_SEED_START // TRAIN_SEEDS_PER_RUN),
            f"--seed must be in [0, {EVAL_SEED_START // TRAIN_SEEDS_PER_RUN}), got {self.seed}",
        )
        require(
            self.eval_seed >= DEV_SEED_START and self.eval_seed + self.eval_episodes <= TEST_SEED_START,
            f"--eval-seed must be in [{DEV_SEED_START}, {TEST_SEED_START - self.eval_episodes}]: the "
            "development scenarios (the test range from "
            f"{TEST_SEED_START} is reserved for final comparisons)",
        )
        self._validate_kl_and_exploration()
        self._validate_curriculum()
        self.env_mix()  # raises on a malformed --env / --env-weights
        self.validate_simulator_flags()
        self._validate_cuda_graph()
        require(
            not self.async_worlds or self.env.strip() == "metadrive",
            f"--async-worlds needs --env metadrive (worlds in processes of their own), got --env {self.env}",
        )
        if self.compile_world:
            check_compile_world(
                [name for name, _ in self.env_mix()], resolve_device(self.device), self.device
            )
        if self.compile_update:
            check_compile_update(resolve_device(self.device), self.device)

    def _validate_kl_and_exploration(self) -> None:
        require(_non_negative(self.kl_coef), f"--kl-coef must be >= 0, got {self.kl_coef}")
        require(
            self.kl_target is None or _positive(self.kl_target),
            f"--kl-target must be > 0, got {self.kl_target}",
        )
        require(
            self.kl_target is None or self.kl_coef > 0,
            "--kl-target adapts --kl-coef from its starting value: give --kl-coef > 0 too",
        )
        require(
            0 <= self.exploration_warmup_iterations <= self.num_iterations,
            "--exploration-warmup-iterations must be in [0, --num-iterations]",
        )
        require(
            MIN_EXPLORATION_SCALE <= self.exploration_start_scale <= 1,
            f"--exploration-start-scale must be in [{MIN_EXPLORATION_SCALE}, 1], "
            f"got {self.exploration_start_scale}",
        )

    def _validate_curriculum(self) -> None:
        require(
            0.0 <= self.curriculum_start <= self.difficulty,
            "--curriculum-start must be in [0, --difficulty] (the curriculum climbs to --difficulty)",
        )
        require(
            0 < self.curriculum_step <= 1, f"--curriculum-step must be in (0, 1], got {self.curriculum_step}"
        )
        require(
            0 < self.curriculum_threshold <= 1,
            f"--curriculum-threshold must be in (0, 1], got {self.curriculum_threshold}",
        )
        require(self.curriculum_min_episodes >= 1, "--curriculum-min-episodes must be >= 1")

    def _validate_cuda_graph(self) -> None:
        if not self.cuda_graph:
            return
        device = resolve_device(self.device)
        require(
            device.type == "cuda",
            f"--cuda-graph needs a CUDA device (--device {self.device} gives {device.type})",
        )
        require(
            all(name == "toy" for name, _ in self.env_mix()),
            f"--cuda-graph needs --env toy (the simulators step on the host), got --env {self.env}",
        )

    def policy_settings(self) -> PolicySettings:
        """The policy this run trains, from its flags (as a checkpoint's stored config rebuilds it)."""
        return PolicySettings.from_config(dataclasses.asdict(self))

    def env_options(self, difficulty: float | None) -> EnvOptions:
        """The simulator flags plus this run's reward (preset and penalties)."""
        return dataclasses.replace(
            super().env_options(difficulty),
            reward=self.reward,
            compile_world=self.compile_world,
            collision_penalty=self.collision_penalty,
            off_road_penalty=self.off_road_penalty,
        )

    def env_mix(self) -> list[tuple[str, int]]:
        """``[(env name, worlds)]``: ``--env`` split by commas, ``--num-envs`` shared by ``--env-weights``."""
        return split_env_mix(self.env, self.env_weights, self.num_envs)

    @property
    def num_eval_worlds(self) -> int:
        return min(self.eval_episodes, self.eval_worlds or MAX_WORLDS)

    @property
    def train_seed_start(self) -> int:
        """First training scenario seed of this run (disjoint from SFT and evaluation seeds)."""
        return TRAIN_SEED_START + self.seed * TRAIN_SEEDS_PER_RUN
