"""The portable build (one per x86-64 level) gives the same bytes at every level, and the
aarch64 builds give them on emulated Arm CPUs.

`pip install` compiles for the building machine (-march=native), so a CI machine with AVX-512
only ever tests the AVX-512 code paths. Users' machines often have AVX2 only (most desktop
CPUs), or nothing beyond the x86-64 baseline: there the kernels take other paths (the AVX2
Philox, the AVX2 mask replay, loops the compiler vectorises differently or not at all). The
portable build (FASTMERGE_NATIVE_ARCH=OFF, what a wheel or a shared disk carries) compiles one
build per level into tmp_path (about 40 s on 2 cores); each test runs the native op tests and
the method tests in a fresh interpreter that imports fastmerge's compiled modules from that
build and picks a level with FASTMERGE_NATIVE_VARIANT. Those tests compare with the plain-torch
reference byte for byte, so a pass means the same bytes on every x86 CPU. Where qemu-user is
installed, one more test runs fastmerge on an emulated AVX2 CPU: the portable build must pick
its AVX2 level there, and an AVX-512 build must be refused rather than crash.

aarch64 (a GH200's Grace, Graviton): the module is cross-compiled for a Neoverse N2 and as the
portable ARMv8.0 build. With an aarch64 Python (`.ci/aarch64-env DIR`, then
FASTMERGE_TEST_AARCH64_ENV=DIR) the same op and method tests run under qemu-aarch64, on an SVE2
CPU and on a Neoverse N1, and the N1 must refuse the N2 build rather than crash.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from _support import snapshot, write_config
from op_support import BUILD_FINDER, REPO, RUN_WITH_BUILD, build_native_modules

LEVELS = ("_native_v4_vpopcntdq", "_native_v4", "_native_v3", "_native_baseline")


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("portable")
    modules = build_native_modules(build, "-DFASTMERGE_NATIVE_ARCH=OFF")
    assert sorted(modules) == sorted(LEVELS)
    return build


def generated_variants(build):
    spec = importlib.util.spec_from_file_location("variants", build / "_native_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


x86_with_cmake = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("cmake"),
                                    reason="needs an x86-64 machine and cmake")


@pytest.mark.slow
@x86_with_cmake
def test_the_portable_build_lists_each_level_with_its_features_fastest_first(portable_build):
    variants = generated_variants(portable_build)
    assert [name for name, _ in variants] == list(LEVELS)
    features = {name: set(found) for name, found in variants}
    assert {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma", "bmi2"} <= features["_native_v4"]
    assert features["_native_v4_vpopcntdq"] == features["_native_v4"] | {"avx512vpopcntdq"}
    assert {"avx2", "fma", "f16c", "bmi2", "movbe"} <= features["_native_v3"]
    assert not any(name.startswith("avx512") for name in features["_native_v3"])
    assert features["_native_baseline"] == set()  # x86-64 itself: SSE2, which every x86-64 CPU has
    flags = (portable_build / "CMakeFiles" / "_native_v3.dir" / "flags.make").read_text()
    assert "-march=x86-64-v3" in flags and "-march=native" not in flags


@pytest.mark.slow
@x86_with_cmake
@pytest.mark.parametrize("variant", ["_native_v3", "_native_baseline"], ids=["avx2", "baseline"])
def test_a_build_for_an_older_cpu_gives_the_reference_bytes(portable_build, variant):
    result = subprocess.run([sys.executable, "-c", RUN_WITH_BUILD, str(portable_build), "-q", "-p", "no:cacheprovider",
                             "tests/ops", "tests/methods", "-k", "native or methods"],
                            capture_output=True, text=True, cwd=REPO, timeout=1200,
                            env=dict(os.environ, FASTMERGE_NATIVE_VARIANT=variant))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


# Under an emulated CPU: the features _cpu finds, which build fastmerge._native is (None: there
# is none, and the warnings say why), and whether TIES gives the same bytes on every backend. argv[1]: a build directory, or "" for the
# installed build.
EMULATED_PROBE = BUILD_FINDER + r"""
import json, warnings
import torch
if sys.argv[1]:
    import_from_build(pathlib.Path(sys.argv[1]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastmerge import ops
    backends = ops.available_backends()
x = [torch.randn(999, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
merged = [ops.ties_merge(x[0], x[1:], [1.0, 0.5], densities=[0.2, 0.3], backend=b) for b in backends]
native = sys.modules.get("fastmerge._native")
from fastmerge import _cpu
print(json.dumps({"cpu": [f for f in _cpu.known_features() if _cpu.supports(f)],
                  "build": native and native.__name__, "backends": backends, "warnings": [str(w.message) for w in caught],
                  "same": all(torch.equal(m.view(torch.int16), merged[0].view(torch.int16)) for m in merged)}))
"""


def run_on_emulated_haswell(build_dir: str) -> dict:
    done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell-v4", sys.executable, "-c", EMULATED_PROBE, build_dir],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@x86_with_cmake
@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="needs qemu-user (apt install qemu-user) to emulate an AVX2 CPU")
def test_an_emulated_avx2_cpu_loads_the_avx2_build_and_refuses_an_avx512_one(portable_build):
    """Under qemu emulating a Haswell (AVX2, no AVX-512), the portable build gives the AVX2 level;
    the installed build, if it needs AVX-512, is refused with a warning instead of the SIGILL
    that loading it would raise there, and TIES still gives the reference's bytes."""
    report = run_on_emulated_haswell(str(portable_build))
    if "avx2" not in report["cpu"]:
        pytest.skip("this qemu emulates no AVX2 (TCG has it from QEMU 7.2)")
    assert "avx512f" not in report["cpu"]
    assert report["build"] == "fastmerge._native_v3" and report["backends"][:2] == ["reference", "native"]
    assert report["same"] and report["warnings"] == []

    from fastmerge._native_variants import VARIANTS as installed

    report = run_on_emulated_haswell("")
    needs_avx512 = all(any(f.startswith("avx512") for f in features) for _, features in installed)
    if needs_avx512:
        assert "native" not in report["backends"] and report["same"]
        (warning,) = report["warnings"]
        assert "native kernels are unavailable" in warning and "needs avx512f" in warning
    else:
        assert "native" in report["backends"] and report["same"]


AARCH64_CXX = "aarch64-linux-gnu-g++"
with_aarch64_cross = pytest.mark.skipif(not (shutil.which(AARCH64_CXX) and shutil.which("cmake")),
                                        reason="needs the aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")


# CMake arguments that cross-compile the module for aarch64 Linux against this Python's headers.
AARCH64_CROSS = ("-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={AARCH64_CXX}",
                 f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}", "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=NEVER",
                 "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER", "-DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=NEVER")


@pytest.fixture(scope="module")
def aarch64_build(tmp_path_factory):
    """The module cross-compiled for an Arm Neoverse N2 (SVE2, LSE atomics, BF16, I8MM), as a
    native build on such a host would be (GCC 12 knows no Neoverse V2, a Grace CPU's core)."""
    build = tmp_path_factory.mktemp("aarch64")
    return build, build_native_modules(build, *AARCH64_CROSS, "-DCMAKE_CXX_FLAGS=-mcpu=neoverse-n2")


@pytest.fixture(scope="module")
def aarch64_portable_build(tmp_path_factory):
    """The portable aarch64 build (FASTMERGE_NATIVE_ARCH=OFF): ARMv8.0, NEON, which every
    aarch64 CPU has; GCC's outline atomics take LSE where the CPU has it."""
    build = tmp_path_factory.mktemp("aarch64-portable")
    return build, build_native_modules(build, *AARCH64_CROSS, "-DFASTMERGE_NATIVE_ARCH=OFF")


@pytest.mark.slow
@with_aarch64_cross
def test_the_module_builds_for_aarch64_with_gcc_and_records_its_features(aarch64_build):
    """ARM hosts (a GH200's Grace CPU, AWS Graviton) build the module with GCC too: no x86-only
    flag (-mprefer-vector-width) or type (_Float16 has no C++ form in GCC 12 for aarch64) may
    reach that compiler. Cross-compiled here, so it is built, not run. The build records the
    Arm features its flags enable, in the kernel's HWCAP names."""
    build, modules = aarch64_build
    for module in [*modules.values(), *build.glob("_cpu*.so")]:
        assert module.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
    ((name, features),) = generated_variants(build)
    assert name == "_native_host"
    assert {"atomics", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16"} <= set(features)
    # _cpu runs on every aarch64 CPU although CMAKE_CXX_FLAGS name the N2: no SVE, and LSE
    # atomics only in libgcc's outline helpers, behind their check of the CPU (a `cbz`).
    if shutil.which(AARCH64_OBJDUMP):
        (cpu_module,) = build.glob("_cpu*.so")
        assert unguarded_armv8_1_instructions(cpu_module) == []


AARCH64_OBJDUMP = "aarch64-linux-gnu-objdump"
LSE_ATOMIC = re.compile(r"\t(ldadd|ldclr|ldeor|ldset|ldsmax|ldsmin|ldumax|ldumin|swp|casp?)[a-z]*\s")
SVE_REGISTER = re.compile(r"\b[zp]\d+\.[bhsdq]\b")


def unguarded_armv8_1_instructions(library: Path) -> list[str]:
    """The instructions in `library` that an ARMv8.0 CPU lacks and that run whatever the CPU:
    SVE ones, and LSE atomics not right after a branch on the CPU's features."""
    lines = subprocess.run([AARCH64_OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for before, line in zip(lines, lines[1:])
            if SVE_REGISTER.search(line) or (LSE_ATOMIC.search(line) and "\tcbz\t" not in before)]


# Prints the features that csrc/cpu/cpu_features.cpp finds on the CPU it runs on.
FEATURE_PROBE = r"""
#include <cstdio>
#include "cpu_features.h"
int main() {
  for (const auto& name : fastmerge::cpu::known_features())
    if (*fastmerge::cpu::supports(name)) std::printf("%s\n", name.c_str());
}
"""


@pytest.mark.slow
@with_aarch64_cross
@pytest.mark.skipif(not shutil.which("qemu-aarch64"), reason="needs qemu-user (apt install qemu-user) to emulate Arm CPUs")
def test_the_aarch64_feature_check_reads_the_cpus_hwcap(aarch64_build, tmp_path):
    """The check that fastmerge._cpu makes on aarch64 Linux (getauxval's HWCAP bits), compiled
    into a static program and run under qemu on three Arm cores: an armv8.0 Cortex-A57, a
    Neoverse N1 (LSE atomics, dot product, no SVE) and qemu's `max` (SVE2 and the rest). So a
    build for the Neoverse N2 above is refused on the first two."""
    build, _ = aarch64_build
    source = tmp_path / "probe.cpp"
    source.write_text(FEATURE_PROBE)
    probe = tmp_path / "probe"
    compiled = subprocess.run([AARCH64_CXX, "-std=c++17", "-O1", "-static", f"-I{REPO / 'csrc' / 'cpu'}", f"-I{build / 'cpu'}",
                               str(source), str(REPO / "csrc" / "cpu" / "cpu_features.cpp"), "-o", str(probe)],
                              capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-3000:]

    def features_on(cpu):
        done = subprocess.run(["qemu-aarch64", "-cpu", cpu, str(probe)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return set(done.stdout.split())

    a57, n1, best = features_on("cortex-a57"), features_on("neoverse-n1"), features_on("max")
    assert "crc32" in a57 and not {"atomics", "asimddp", "sve"} & a57
    assert {"atomics", "asimddp", "asimdhp", "lrcpc"} <= n1 and not {"sve", "sve2", "i8mm"} & n1
    assert {"atomics", "sve", "sve2", "i8mm", "bf16"} <= best and a57 <= n1 <= best
    ((_, needed),) = generated_variants(build)
    assert not set(needed) <= n1 and set(needed) <= best


@pytest.mark.slow
@with_aarch64_cross
def test_the_portable_aarch64_build_is_armv8_0(aarch64_portable_build):
    """What a portable aarch64 wheel carries runs on any aarch64 CPU: one build, needing no
    feature, with no SVE or unguarded LSE instruction in it."""
    build, modules = aarch64_portable_build
    assert generated_variants(build) == (("_native_baseline", ()),)
    if shutil.which(AARCH64_OBJDUMP):
        assert unguarded_armv8_1_instructions(modules["_native_baseline"]) == []


# An aarch64 Python 3.11 with torch, run under qemu-user, made by `.ci/aarch64-env DIR`.
AARCH64_ENV = os.environ.get("FASTMERGE_TEST_AARCH64_ENV", "")
with_aarch64_env = pytest.mark.skipif(
    not (AARCH64_ENV and os.access(os.path.join(AARCH64_ENV, "python"), os.X_OK) and sys.version_info[:2] == (3, 11)),
    reason="needs FASTMERGE_TEST_AARCH64_ENV: an aarch64 Python 3.11 made by .ci/aarch64-env (the module is built for this Python)")

def emulated_arm_tree(tree: Path, build: Path) -> Path:
    """A copy of the package with `build`'s compiled modules in it, and of the tests beside it,
    as the aarch64 Python imports them: its child interpreters (the thread-count and fallback
    tests start some) find the same build without any import hook."""
    shutil.copytree(REPO / "fastmerge", tree / "fastmerge", ignore=shutil.ignore_patterns("__pycache__", "*.so", "_native_variants.py"))
    shutil.copytree(REPO / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tree)
    shutil.copy(build / "_native_variants.py", tree / "fastmerge")
    for module in build.glob("*.so"):  # named for this Python's platform: `<name>.so` is what any Python imports
        shutil.copy(module, tree / "fastmerge" / f"{module.name.split('.')[0]}.so")
    return tree


def run_on_arm(tree: Path, cpu: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The aarch64 Python with `args`, in `tree`, under qemu emulating `cpu` (a QEMU_CPU value)."""
    python = os.path.join(AARCH64_ENV, "python")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.path.join(AARCH64_ENV, "site")]), QEMU_CPU=cpu,
               FASTMERGE_TEST_PYTHON=python, **env)
    return subprocess.run([python, *args], capture_output=True, text=True, cwd=tree, env=env, timeout=1800)


@pytest.mark.slow
@with_aarch64_cross
@with_aarch64_env
@pytest.mark.parametrize("build, cpu", [("aarch64_build", "max,sve-default-vector-length=16"),
                                        ("aarch64_portable_build", "neoverse-n1")],
                         ids=["neoverse-n2-build-on-sve2-128-bit", "portable-build-on-neoverse-n1"])
def test_the_aarch64_builds_give_the_reference_bytes_on_emulated_arm_cpus(request, build, cpu, tmp_path):
    """The op and method tests, run by an aarch64 Python under qemu: the N2 build on a CPU with
    SVE2 at 128 bits (a Grace's and an N2's vector length), and the portable ARMv8.0 build on a
    Neoverse N1 (NEON, no SVE; torch 2.10's aarch64 wheel needs ARMv8.2, so no older core). The
    native kernels must give the reference's bytes there as on x86 (the compiler vectorises for
    SVE or NEON, and `char` is unsigned)."""
    build, modules = request.getfixturevalue(build)
    (variant,) = modules
    tree = emulated_arm_tree(tmp_path / "tree", build)
    done = run_on_arm(tree, cpu, "-c", RUN_WITH_BUILD, str(tree / "fastmerge"), "-q", "-p", "no:cacheprovider",
                      "tests/ops", "tests/methods", "-k", "native or methods", FASTMERGE_NATIVE_VARIANT=variant)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.mark.slow
@with_aarch64_cross
@with_aarch64_env
def test_an_older_arm_cpu_refuses_a_newer_build_and_merges_on_the_reference(aarch64_build, tmp_path):
    """On an emulated Neoverse N1 (no SVE) the N2 build is refused with a warning that names what
    the CPU lacks, and TIES gives the reference's bytes all the same."""
    build, _ = aarch64_build
    tree = emulated_arm_tree(tmp_path / "tree", build)
    done = run_on_arm(tree, "neoverse-n1", "-c", EMULATED_PROBE, "")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "sve" not in report["cpu"] and report["build"] is None and "native" not in report["backends"]
    (warning,) = report["warnings"]
    assert "native kernels are unavailable" in warning and "sve2" in warning and report["same"]


# Every element-wise method (each native kernel: blend, TIES, DARE/della draws, breadcrumbs'
# ranks, slerp, model_stock's geometry), as fastmerge.run configs for the tiny_models fixture.
def cross_machine_configs(models: dict[str, Path]) -> dict[str, dict]:
    def three(**parameters):
        return [{"model": str(models[name]), "parameters": parameters} for name in ("ft1", "ft2", "ft3")]

    base = str(models["base"])
    return {
        "linear": {"merge_method": "linear", "models": three(weight=0.5)},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": three(weight=0.4)},
        "ties": {"merge_method": "ties", "base_model": base, "models": three(weight=0.5, density=0.4)},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": three(weight=0.5, density=0.4)},
        "della": {"merge_method": "della", "base_model": base, "models": three(weight=0.5, density=0.4, epsilon=0.1)},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": three(weight=0.5, density=0.8, gamma=0.05)},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": str(models[n])} for n in ("ft1", "ft2")]},
        "slerp": {"merge_method": "slerp", "base_model": str(models["ft1"]), "models": [{"model": str(models["ft1"])},
                  {"model": str(models["ft2"])}], "parameters": {"t": 0.3}},
    }


# argv: the configs' directory, the outputs' directory: runs each config into outputs/<name>,
# then prints the backends it had.
MERGE_EACH = r"""
import pathlib, sys
import fastmerge
for config in sorted(pathlib.Path(sys.argv[1]).glob("*.yml")):
    fastmerge.run(str(config), str(pathlib.Path(sys.argv[2]) / config.stem))
print(" ".join(fastmerge.ops.available_backends()))
"""


@pytest.mark.slow
@with_aarch64_cross
@with_aarch64_env
def test_merges_on_an_emulated_arm_cpu_write_the_files_they_write_here(aarch64_build, tiny_models, tmp_path):
    """Byte-exact reproducibility across machines: eight merges, one per element-wise method, run
    here (x86, this torch, the installed build) and by the aarch64 Python (torch 2.10, the N2
    build, an SVE2 CPU) write the same files, byte for byte."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, config in cross_machine_configs(tiny_models).items():
        write_config(configs / f"{name}.yml", config)
    here = subprocess.run([sys.executable, "-c", MERGE_EACH, str(configs), str(tmp_path / "x86")], capture_output=True, text=True)
    assert here.returncode == 0, here.stderr[-3000:]
    tree = emulated_arm_tree(tmp_path / "tree", aarch64_build[0])
    arm = run_on_arm(tree, "max,sve-default-vector-length=16", "-c", MERGE_EACH, str(configs), str(tmp_path / "arm"))
    assert arm.returncode == 0, arm.stderr[-3000:]
    assert "native" in arm.stdout.split() and "native" in here.stdout.split()
    for name in cross_machine_configs(tiny_models):
        files = snapshot(tmp_path / "x86" / name)
        assert "model.safetensors" in files and snapshot(tmp_path / "arm" / name) == files, name
