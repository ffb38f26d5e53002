"""Merge-quality benchmark: do merges of fine-tuned models keep what each fine-tune learned?

Tiny character-level Llama models are pre-trained on a general text stream, fine-tuned on five
conflicting synthetic tasks, merged by every method fastmerge has, and scored by exact match;
a continual-learning scenario compares sequential fine-tuning with merging after each task.
Run with `python -m bench.quality` (see README.md in this folder); the entry point in Python is
`bench.quality.pipeline.run_benchmark`. Nothing is imported here, so `__main__` can configure
the OpenMP runtime before torch loads.
"""
