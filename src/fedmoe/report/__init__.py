"""Benchmark report (docs/algorithms.md §6): the paper's Tables 1–2, convergence speed-ups, CVI and
Figures 1 and 4, recomputed from run directories (``fedmoe report RUN_DIR... --out DIR``)."""

from fedmoe.report.build import Report, build_report

__all__ = ["Report", "build_report"]
