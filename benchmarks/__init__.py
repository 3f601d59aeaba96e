"""Benchmarks of the scaling tool: `python -m benchmarks [--only NAME] [--quick]` (or `make bench`).

Each group is a function `(Ctx) -> list[Row]`; every figure is a ratio measured side by side
in the same run (see benchmarks.common). Results go to bench-results/latest.json.
"""
