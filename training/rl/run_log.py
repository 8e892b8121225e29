"""Where a training run reports: the metrics files, TensorBoard, the progress bar and console lines.

``train_metrics.json`` and ``eval_metrics.json`` hold every record so far (rewritten whole, atomically,
after each one); TensorBoard shows the same names, grouped as CleanRL groups them
(``losses/value_loss``, ``policy/kl_to_sft``, ``eval/ade``). Only rank 0 of a distributed run writes.
"""

from __future__ import annotations

import math
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from training.common.io import atomic_write_json
from training.common.progress import log_line, progress_bar
from training.rl.run import Run

# TensorBoard group of each training metric; the others go to "charts", evaluation ones to "eval".
TB_GROUPS = {
    "policy_loss": "losses",
    "value_loss": "losses",
    "entropy": "losses",
    "approx_kl": "losses",
    "clip_fraction": "losses",
    "explained_variance": "losses",
    "loss": "losses",
    "grad_norm": "losses",
    "residual_l2": "losses",
    "std": "policy",
    "delta_norm": "policy",
    "kl_to_sft": "policy",
    "kl_coef": "policy",
    "exploration_scale": "policy",
    "curriculum_level": "curriculum",
    "difficulty": "curriculum",
    "lr": "charts",
    "steps_per_s": "charts",
}


class RunLog:
    """The reports of ``run`` from its current iteration on; a fresh run's first record is the
    SFT baseline (``run.eval_records[0]``), a resumed run's TensorBoard drops what came after
    its checkpoint."""

    def __init__(self, run: Run, resumed: bool) -> None:
        self.run = run
        self.is_main = run.ctx.is_main
        config = run.config
        self.writer = (
            SummaryWriter(log_dir=str(run.out_dir), purge_step=run.env_steps if resumed else None)
            if self.is_main
            else None
        )
        self.bar = progress_bar(
            config.num_iterations, "ppo", "it", config.progress and self.is_main, run.iteration
        )
        if self.is_main and not resumed:
            atomic_write_json(run.out_dir / "eval_metrics.json", run.eval_records)
            self._scalars("eval", run.eval_records[0], 0)

    def train(self, record: dict[str, Any]) -> None:
        """One iteration's training record: ``train_metrics.json`` and TensorBoard."""
        if self.is_main:
            self.run.train_records.append(record)
            atomic_write_json(self.run.out_dir / "train_metrics.json", self.run.train_records)
            self._scalars("train", record, self.run.env_steps)

    def eval(self, record: dict[str, Any]) -> None:
        """An evaluation record (rank 0 evaluates): ``eval_metrics.json`` and TensorBoard."""
        self.run.eval_records.append(record)
        atomic_write_json(self.run.out_dir / "eval_metrics.json", self.run.eval_records)
        self._scalars("eval", record, self.run.env_steps)

    def iteration_done(self, record: dict[str, Any]) -> None:
        """Advance the bar; one line with the speed, the return and the latest evaluation's ADE."""
        self.bar.update(1)
        if not self.is_main:
            return
        run = self.run
        latest = run.eval_records[-1]
        self.bar.set_postfix(
            steps_s=f"{record['steps_per_s']:.0f}",
            ret=_return_text(record["episode_return"], "n/a"),
            ade=f"{latest['ade']:.3f}",
        )
        log_line(progress_line(run.iteration, run.config.num_iterations, record, latest), run.config.progress)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()

    def _scalars(self, split: str, record: dict[str, Any], step: int) -> None:
        """TensorBoard scalars under the same names as the metrics files (``losses/value_loss`` ...)."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key in ("iteration", "env_steps") or not isinstance(value, int | float):
                continue
            group = "eval" if split == "eval" else TB_GROUPS.get(key, "charts")
            self.writer.add_scalar(f"{group}/{key}", value, step)


def progress_line(
    iteration: int, num_iterations: int, record: dict[str, Any], latest_eval: dict[str, Any]
) -> str:
    """The console line of one iteration (where no progress bar is drawn)."""
    return (
        f"iteration {iteration}/{num_iterations}: {record['steps_per_s']:.0f} steps/s, "
        f"episode return {_return_text(record['episode_return'], 'n/a (no episode ended)')}, "
        f"eval ADE {latest_eval['ade']:.3f} m (iteration {latest_eval['iteration']})"
    )


def _return_text(mean_return: float, when_none_ended: str) -> str:
    """The iteration's mean episode return; NaN means that no episode ended in it (long episodes,
    few worlds), which a user should not read as a numerical failure."""
    return f"{mean_return:.2f}" if math.isfinite(mean_return) else when_none_ended
