"""Benchmarks for fastmerge: kernel speed, end-to-end merge speed, and merge quality.

Each benchmark is a subpackage; `python -m bench.quality` runs the merge-quality benchmark.
"""
