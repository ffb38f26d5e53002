"""End-to-end merge benchmark: fastmerge (and mergekit, when installed) on the same configs.

For a generated checkpoint set (bench.checkpoints) this runs every method in METHODS that
fastmerge has registered, each merge in a fresh subprocess (peak RSS is the child's own, from
GNU time, never the benchmark's), with the page cache warm as in the issue's baseline. In the same
run it measures the I/O roofline of each config: read all of its input files and write as many
bytes as the output has, with plain large reads and writes, flushed to disk with fsync as
fastmerge's writer does. efficiency = roofline / wall (1.0 = as fast as just moving the bytes).
fastmerge writes its output with direct IO, which can beat a plain write by far where filling
fresh page-cache pages is slow (a VM whose host takes freed memory back), so the same bytes are
also written that way and reported as a second, stricter roofline ("direct"): the reads plus a
direct-IO write through fastmerge's own shard file.
It also times fastmerge's fixed start-up (`python -m fastmerge --version`: the interpreter,
importing the CLI, torch and the native kernels, and exit) before each merge, and reports the
efficiency of the rest, roofline / (wall - start-up), since on a small box importing torch alone
is seconds of every merge.

With `--repeat N` the fastmerge merge, its start-up and the rooflines are each measured N times
and the medians reported (a VM's noise moves one few-second figure by a third and more; peak RSS
is the highest of the runs); mergekit, minutes per merge, runs once.

With `--device cuda` fastmerge merges on the GPU (and mergekit gets `--cuda`); the column "eff r"
is then the one the GPU target speaks of, efficiency against reading the inputs alone.

Prints a table, writes a JSON with every figure and a PNG chart.
Run: `python -m bench.e2e --preset 1b --work /tmp/fm-bench` (add `--no-mergekit` to skip it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import yaml

from bench.checkpoints import BenchModels, add_generator_args, generate, model_files, spec_from_args
from fastmerge.io.checkpoint import Checkpoint
from fastmerge.io.shard_file import ShardFile, pwrite_all
from fastmerge.methods import method_names
from fastmerge.vocab.names import is_vocabulary_tensor

MERGEKIT_YAML = Path("/opt/mkvenv/bin/mergekit-yaml")
TIME = Path("/usr/bin/time")
READ_BLOCK = 64 << 20
# The baseline weights for three fine-tunes; other counts get equal weights.
BASELINE_WEIGHTS = (0.5, 0.3, 0.2)


def _weights(k: int) -> list[float]:
    return list(BASELINE_WEIGHTS) if k == len(BASELINE_WEIGHTS) else [round(1.0 / k, 6)] * k


def _task_vector_config(method: str, models: BenchModels, **params) -> dict:
    """base + every fine-tune, each with its weight and the given per-model parameters."""
    return {
        "merge_method": method,
        "base_model": str(models.base),
        "models": [
            {"model": str(path), "parameters": {"weight": w, **params}}
            for path, w in zip(models.fine_tunes, _weights(len(models.fine_tunes)))
        ],
        "dtype": "bfloat16",
    }


def _linear(models: BenchModels) -> dict:
    config = _task_vector_config("linear", models)
    del config["base_model"]
    return config


def _slerp(models: BenchModels) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": str(models.base),
        "models": [{"model": str(models.base)}, {"model": str(models.fine_tunes[0])}],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    }


def _model_stock(models: BenchModels) -> dict:
    return {
        "merge_method": "model_stock",
        "base_model": str(models.base),
        "models": [{"model": str(path)} for path in models.fine_tunes],
        "dtype": "bfloat16",
    }


def _with_global(config: dict, **params) -> dict:
    config["parameters"] = params
    return config


# method -> mergekit config for a checkpoint set (the baseline settings where it has them).
METHODS: dict[str, Callable[[BenchModels], dict]] = {
    "linear": _linear,
    "task_arithmetic": lambda m: _task_vector_config("task_arithmetic", m),
    "ties": lambda m: _with_global(_task_vector_config("ties", m, density=0.5), normalize=True),
    "dare_ties": lambda m: _task_vector_config("dare_ties", m, density=0.5),
    "slerp": _slerp,
    "model_stock": _model_stock,
    "breadcrumbs": lambda m: _task_vector_config("breadcrumbs", m, density=0.9, gamma=0.01),
    "della": lambda m: _task_vector_config("della", m, density=0.5, epsilon=0.1),
}


@dataclass
class MergeRun:
    """One merge in a child process."""

    tool: str
    method: str
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    log_tail: str = ""


@dataclass
class Roofline:
    """Plain-file-I/O lower bound for one config: read its inputs, write its output size; and
    the same with the output written by direct IO."""

    read_bytes: int
    write_bytes: int
    read_s: float
    write_s: float
    direct_write_s: float

    @property
    def seconds(self) -> float:
        return self.read_s + self.write_s

    @property
    def direct_seconds(self) -> float:
        return self.read_s + self.direct_write_s


def config_inputs(config: dict) -> list[Path]:
    """Distinct model directories a config reads, base included."""
    paths = [Path(m["model"]) for m in config["models"]]
    if "base_model" in config:
        paths.append(Path(config["base_model"]))
    return sorted(set(paths))


def read_files(files: list[Path]) -> tuple[int, float]:
    """Read every file once with large reads into one reused buffer; (bytes, seconds)."""
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    total, started = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while count := f.readinto(view):
                total += count
    return total, time.perf_counter() - started


def write_bytes(path: Path, nbytes: int, direct: bool = False) -> float:
    """Write nbytes with large sequential writes and fsync; seconds taken. Plain writes, or with
    `direct` through fastmerge's shard file (O_DIRECT where the filesystem allows it)."""
    block = memoryview(os.urandom(1 << 20) * (READ_BLOCK >> 20))
    pieces = [(offset, block[: min(len(block), nbytes - offset)]) for offset in range(0, nbytes, len(block))]
    started = time.perf_counter()
    if direct:
        shard = ShardFile(path, nbytes)
        try:
            for offset, piece in pieces:
                shard.write(offset, piece)
            shard.finish()
        finally:
            shard.close()
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset, piece in pieces:
                pwrite_all(fd, piece, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def measure_roofline(inputs: list[Path], output_bytes: int, scratch: Path, repeat: int = 1) -> Roofline:
    """The roofline measured `repeat` times: each part's median (reads, plain write, direct write).
    Each timed read follows an untimed one, as each merge does (see bench_method on DAMON)."""
    parts = []
    for _ in range(repeat):
        read_files(model_files(inputs))  # warm the page cache, as before each merge
        read, read_s = read_files(model_files(inputs))
        plain = write_bytes(scratch / "roofline.bin", output_bytes)
        parts.append((read_s, plain, write_bytes(scratch / "roofline.bin", output_bytes, direct=True)))
    return Roofline(read, output_bytes, *(statistics.median(part) for part in zip(*parts)))


def run_child(tool: str, method: str, command: list[str], env: dict[str, str] | None = None) -> MergeRun:
    """Run one merge as a child process (with environment `env`, or this one's); its wall time
    and its own peak RSS.

    The child is started through /usr/bin/time, whose %M is the peak RSS of the command it
    forks. Asking the kernel directly (wait4 on our own child) would not do: a child's maximum
    includes the memory of the process it was forked from before exec, i.e. this benchmark.
    Where GNU time is missing (container images often lack it, e.g. the GPU machines'),
    fastmerge's own report gives the figure (its peak RSS line); other tools need GNU time.
    """
    timed = TIME.exists()
    if not timed and tool != "fastmerge":
        raise FileNotFoundError(f"{TIME} (GNU time) is needed to measure {tool}'s peak RSS")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        started = time.perf_counter()
        done = subprocess.run([str(TIME), "-f", "%M", "-o", stats.name, *command] if timed else command,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - started
        output = done.stdout.decode(errors="replace")
        # On failure GNU time writes "Command exited with non-zero status N" before the figure.
        peak = int(stats.read().split()[-1]) * 1024 if timed else reported_peak_rss(output)
    return MergeRun(tool, method, wall, peak, done.returncode, output[-2000:])


_BINARY_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def reported_peak_rss(output: str) -> int:
    """The peak RSS in a fastmerge run's summary ("... peak RSS 923.07 MiB, ..."), in bytes;
    0 when the run printed none (it failed)."""
    match = re.search(r"peak RSS ([0-9.]+) (B|KiB|MiB|GiB|TiB)", output)
    return round(float(match.group(1)) * _BINARY_UNITS[match.group(2)]) if match else 0


def median_run(runs: list[MergeRun]) -> MergeRun:
    """What `runs` of one command report together: a failed run if any failed, else the run
    of median wall time (the upper middle of an even count) with the highest peak RSS of all."""
    failed = [run for run in runs if run.returncode != 0]
    if failed:
        return failed[0]
    middle = sorted(runs, key=lambda run: run.wall_s)[len(runs) // 2]
    return replace(middle, peak_rss_bytes=max(run.peak_rss_bytes for run in runs))


def fastmerge_command(config_path: Path, out: Path, device: str = "cpu") -> list[str]:
    return [sys.executable, "-m", "fastmerge", "run", str(config_path), str(out), "--quiet", "--device", device]


def startup_command() -> list[str]:
    """A fastmerge process that starts, imports what a merge imports, and exits."""
    return [sys.executable, "-m", "fastmerge", "--version"]


def mergekit_command(config_path: Path, out: Path, device: str = "cpu") -> list[str]:
    return [str(MERGEKIT_YAML), str(config_path), str(out), "--no-write-model-card"] + (["--cuda"] if device == "cuda" else [])


def output_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor parity of fastmerge's output and mergekit's: the names only one has, and per
    common tensor its shapes, dtypes and whether the bytes are the same; for token-indexed tensors
    (embeddings, lm_head) also the largest absolute difference and how many rows differ."""
    a, b = Checkpoint(ours), Checkpoint(theirs)
    try:
        report = {"only_fastmerge": sorted(set(a.names) - set(b.names)),
                  "only_mergekit": sorted(set(b.names) - set(a.names)), "tensors": {}}
        for name in sorted(set(a.names) & set(b.names)):
            x, y = a.tensor(name), b.tensor(name)
            same_layout = x.dtype == y.dtype and x.shape == y.shape
            entry = {"shape": [list(x.shape), list(y.shape)], "dtype": [str(x.dtype), str(y.dtype)],
                     "same_bytes": same_layout and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))}
            if is_vocabulary_tensor(name) and same_layout:
                diff = (x.float() - y.float()).abs()
                entry["max_abs_diff"] = diff.max().item() if diff.numel() else 0.0
                entry["rows_differing"] = int((diff.reshape(diff.shape[0], -1) > 0).any(dim=1).sum()) if diff.numel() else 0
            report["tensors"][name] = entry
            a.release(name)
            b.release(name)
        return report
    finally:
        a.close()
        b.close()


def identical(parity: dict) -> bool:
    """Whether a compare_outputs report found the same tensors with the same bytes."""
    return not parity["only_fastmerge"] and not parity["only_mergekit"] and all(
        entry["same_bytes"] for entry in parity["tensors"].values())


@dataclass
class MethodResult:
    method: str
    input_bytes: int
    output_bytes: int
    roofline: Roofline
    fastmerge: MergeRun
    mergekit: MergeRun | None
    startup: MergeRun
    runs: list[MergeRun]  # every child run, the repeats included

    def row(self) -> dict:
        fm = self.fastmerge
        row = {
            "method": self.method,
            "fastmerge_runs_s": [run.wall_s for run in self.runs if run.tool == "fastmerge" and run.method == self.method],
            "input_gb": self.input_bytes / 1e9,
            "output_gb": self.output_bytes / 1e9,
            "roofline_s": self.roofline.seconds,
            "roofline_read_s": self.roofline.read_s,
            "roofline_write_s": self.roofline.write_s,
            "fastmerge_s": fm.wall_s,
            "fastmerge_gbps": self.input_bytes / fm.wall_s / 1e9,
            "fastmerge_peak_rss_gb": fm.peak_rss_bytes / 1e9,
            "efficiency": self.roofline.seconds / fm.wall_s,
            "roofline_direct_s": self.roofline.direct_seconds,
            "efficiency_direct": self.roofline.direct_seconds / fm.wall_s,
            # The GPU target's bound: reading the inputs alone.
            "efficiency_read": self.roofline.read_s / fm.wall_s,
            "startup_s": self.startup.wall_s,
            # None when the start-up was not shorter than the merge (a tiny model, timing noise).
            "efficiency_after_startup": (self.roofline.seconds / (fm.wall_s - self.startup.wall_s)
                                         if fm.wall_s > self.startup.wall_s else None),
            "fastmerge_ok": fm.returncode == 0,
        }
        if self.mergekit is not None:
            mk = self.mergekit
            row.update(
                mergekit_s=mk.wall_s,
                mergekit_peak_rss_gb=mk.peak_rss_bytes / 1e9,
                mergekit_ok=mk.returncode == 0,
                speedup=mk.wall_s / fm.wall_s,
            )
        return row


def bench_method(method: str, models: BenchModels, work: Path, with_mergekit: bool, repeat: int = 1,
                 device: str = "cpu") -> MethodResult:
    """fastmerge (`repeat` times, medians), its start-up and the rooflines of one method, then
    mergekit (once). The rooflines come before mergekit so that they find the page cache as
    fastmerge did: this VM's DAMON pages out file pages it sees as cold, and after mergekit's
    minutes the timed roofline reads of three methods came from disk (37-44 s for 8.8 GB that
    the same run read from the cache in 2.4-4.5 s)."""
    config = METHODS[method](models)
    config_path = work / f"{method}.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    inputs = config_inputs(config)
    runs: dict[str, list[MergeRun]] = {}

    def merge(tool: str, command, times: int) -> int:
        """Runs `tool` `times` times (stopping at a failure); returns the output size of the
        last successful run, 0 if none."""
        out, out_size = work / f"out-{tool}-{method}", 0
        for _ in range(times):
            shutil.rmtree(out, ignore_errors=True)
            read_files(model_files(inputs))  # warm the page cache, as the baseline did
            run = run_child(tool, method, command(config_path, out, device))
            runs.setdefault(tool, []).append(run)
            if run.returncode != 0:
                print(f"  {tool} {method} failed:\n{run.log_tail}", file=sys.stderr)
                break
            out_size = output_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        return out_size

    out_size = merge("fastmerge", fastmerge_command, repeat)
    runs["start-up"] = [run_child("fastmerge", "start-up", startup_command()) for _ in range(repeat)]
    if not out_size:  # fastmerge failed: a bf16 output is the size of one input model
        out_size = sum(p.stat().st_size for p in model_files(inputs[:1]))
    roofline = measure_roofline(inputs, out_size, work, repeat)
    if with_mergekit:
        merge("mergekit", mergekit_command, 1)
    in_size = sum(p.stat().st_size for p in model_files(inputs))
    mergekit = median_run(runs["mergekit"]) if "mergekit" in runs else None
    return MethodResult(method, in_size, out_size, roofline, median_run(runs["fastmerge"]), mergekit,
                        median_run(runs["start-up"]), [run for group in runs.values() for run in group])


def print_table(rows: list[dict]) -> None:
    header = f"{'method':<16}{'in GB':>7}{'roofline s':>11}{'fastmerge s':>12}{'GB/s':>7}{'RSS GB':>8}{'eff':>6}" \
             f"{'direct s':>9}{'eff d':>6}{'eff r':>6}{'start-up s':>11}{'eff after':>10}{'mergekit s':>11}{'mk RSS GB':>10}{'speedup':>9}"
    print(header)
    for r in rows:
        mk = (f"{r['mergekit_s']:>11.2f}{r['mergekit_peak_rss_gb']:>10.2f}{r['speedup']:>8.1f}x"
              if "mergekit_s" in r else f"{'-':>11}{'-':>10}{'-':>9}")
        flag = "" if r["fastmerge_ok"] else "  (fastmerge FAILED)"
        after = "-" if r["efficiency_after_startup"] is None else f"{r['efficiency_after_startup']:.2f}"
        print(f"{r['method']:<16}{r['input_gb']:>7.2f}{r['roofline_s']:>11.2f}{r['fastmerge_s']:>12.2f}"
              f"{r['fastmerge_gbps']:>7.2f}{r['fastmerge_peak_rss_gb']:>8.2f}{r['efficiency']:>6.2f}"
              f"{r['roofline_direct_s']:>9.2f}{r['efficiency_direct']:>6.2f}{r['efficiency_read']:>6.2f}{r['startup_s']:>11.2f}{after:>10}{mk}{flag}")


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    series = [("roofline (plain I/O)", "roofline_s", "#999999"), ("roofline (direct write)", "roofline_direct_s", "#cccccc"),
              ("fastmerge", "fastmerge_s", "#1f77b4")]
    if any("mergekit_s" in r for r in rows):
        series.append(("mergekit 0.1.5", "mergekit_s", "#d62728"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    for i, (label, key, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r.get(key, 0) for r in rows], width, label=label, color=color)
    ax.set_xticks(range(len(rows)), names, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("wall time, s (log)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every fastmerge-against-mergekit benchmark takes: the checkpoint set
    (bench.checkpoints), --work and --no-mergekit; `doc` is the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_generator_args(parser)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fm-bench"), help="where models and outputs go (not the repo)")
    parser.add_argument("--no-mergekit", dest="mergekit", action="store_false", help="skip mergekit even if installed")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure fastmerge, its start-up and the rooflines this many times, report medians [1]")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where fastmerge merges (mergekit gets --cuda with cuda); 'eff r' is against the reads alone, the GPU target's roofline [cpu]")
    parser.add_argument("--json", type=Path, default=None, help="results file [default: WORK/e2e-PRESET.json]")
    parser.add_argument("--chart", type=Path, default=None, help="chart file [default: WORK/e2e-PRESET.png]")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    spec = spec_from_args(args)
    label = "custom" if args.custom else args.preset
    models = generate(args.work / label, spec)
    print(f"models: {models.directory} ({'reused' if models.reused else f'generated in {models.seconds:.1f} s'})", flush=True)
    with_mergekit = args.mergekit and MERGEKIT_YAML.exists()
    registered = set(method_names())
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    skipped = [m for m in wanted if m not in registered]
    if skipped:
        print(f"skipping methods fastmerge has not registered: {', '.join(skipped)}")
    results = []
    for method in (m for m in wanted if m in registered):
        results.append(bench_method(method, models, args.work, with_mergekit, args.repeat, args.device))
        row = results[-1].row()
        mergekit = f", mergekit {row['mergekit_s']:.1f} s {row['mergekit_peak_rss_gb']:.2f} GB" if "mergekit_s" in row else ""
        print(f"  {method}: fastmerge {row['fastmerge_s']:.1f} s {row['fastmerge_peak_rss_gb']:.2f} GB{mergekit}, "
              f"roofline {row['roofline_s']:.1f} s (direct {row['roofline_direct_s']:.1f} s), start-up {row['startup_s']:.1f} s", flush=True)
    rows = [r.row() for r in results]
    print_table(rows)
    report = {
        "preset": label,
        "spec": spec.to_json(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "mergekit": with_mergekit,
        "repeat": args.repeat,
        "device": args.device,
        "skipped": skipped,
        "results": rows,
        "runs": [asdict(run) for r in results for run in r.runs],
    }
    json_path = args.json or args.work / f"e2e-{label}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    chart_path = args.chart or args.work / f"e2e-{label}.png"
    plot(rows, f"fastmerge ({args.device}) vs mergekit, {label} preset, base + {spec.fine_tunes} fine-tunes", chart_path)
    print(f"wrote {json_path} and {chart_path}")


if __name__ == "__main__":
    main()
