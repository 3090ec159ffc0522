"""Benchmarks of mmload: ``python bench/throughput.py`` (see its ``--help``); results go to ``results/``."""
