"""The console scripts (`fastmerge` and the mergekit drop-ins): the CLI run as a short-lived process.

A merge process imports torch and exits soon after, and CPython's cyclic garbage collector
spends a large share of that fixed cost on objects that live until the very end: it runs
repeatedly while torch's modules are imported, and again at shut-down over all of them. On this
project's 2-core CI machine kind, `import torch` plus interpreter exit took 3.0 s and 2.2 s
with the steps below, about 0.8 s of every merge's wall time (a linear merge of the 1.1B preset
takes about 5 s in all). So the scripts:

- switch the collector off while importing the CLI and its dependencies, then `gc.freeze()` what
  was imported (moved out of every later collection) and switch it back on, so the merge itself
  runs with the collector working as usual;
- leave with `os._exit` once the CLI has returned and stdout/stderr are flushed. By then every
  output file is closed, fsynced and renamed into place (or the staged directory removed), so
  the interpreter's teardown would only free memory the kernel frees anyway;
- say so in one line, not a traceback, when Ctrl-C comes while torch is being imported (once a
  command runs, the CLI handles signals itself).

`fastmerge.cli.main` stays the in-process entry (tests, `python -m fastmerge.cli`): it returns.
"""

from __future__ import annotations

import gc
import os
import sys


def _run(entry: str) -> None:
    try:
        gc.disable()
        try:
            from . import cli
        finally:
            gc.freeze()
            gc.enable()
        code = getattr(cli, entry)()
    except KeyboardInterrupt:  # Ctrl-C while torch loads (a second or more): nothing has been written yet
        print("fastmerge: interrupted before the command started; nothing was written", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fastmerge() -> None:
    _run("main")


def fastmerge_yaml() -> None:
    _run("mergekit_yaml_main")


def fastmerge_multi() -> None:
    _run("mergekit_multi_main")


def fastmerge_pytorch() -> None:
    _run("mergekit_pytorch_main")


def fastmerge_legacy() -> None:
    _run("mergekit_legacy_main")


def fastmerge_layershuffle() -> None:
    _run("mergekit_layershuffle_main")


def fastmerge_moe() -> None:
    _run("mergekit_moe_main")


def fastmerge_extract_lora() -> None:
    _run("mergekit_extract_lora_main")


def fastmerge_tokensurgeon() -> None:
    _run("mergekit_tokensurgeon_main")
