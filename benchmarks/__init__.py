"""Benchmarks and reproducible measurements; results are recorded in docs/."""
