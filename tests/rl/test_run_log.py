"""The console line each PPO iteration prints where no progress bar is drawn."""

from __future__ import annotations

from training.rl.run_log import progress_line

LATEST_EVAL = {"ade": 2.6712, "iteration": 50}


def test_the_line_gives_the_speed_the_mean_return_and_the_latest_evaluation() -> None:
    line = progress_line(7, 100, {"steps_per_s": 57.4, "episode_return": 22.594}, LATEST_EVAL)
    assert line == "iteration 7/100: 57 steps/s, episode return 22.59, eval ADE 2.671 m (iteration 50)"


def test_an_iteration_in_which_no_episode_ended_says_so_instead_of_nan() -> None:
    line = progress_line(96, 100, {"steps_per_s": 59.0, "episode_return": float("nan")}, LATEST_EVAL)
    assert "episode return n/a (no episode ended)," in line
    assert "nan" not in line
