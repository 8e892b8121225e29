"""Evaluation: ADE/FDE and closed-loop metrics, deterministic paired evaluation, plots, report.

``compare_sft_vs_rl`` (the command) builds on :mod:`eval.closed_loop` (runs a policy on a batch
of scenarios), :mod:`eval.metrics` (per-episode metrics, paired bootstrap comparison),
:mod:`eval.plots` and :mod:`eval.report`.
"""
