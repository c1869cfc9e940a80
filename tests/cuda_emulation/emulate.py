"""Builds this project's CUDA sources as host C++ over the emulator (shim.h), plain or sanitized.

The sources are compiled as they are, with `-x c++ -DDSNT_CUDA_EMULATION`: csrc/cuda/launch.cuh
then includes shim.h and launches on the emulator, and csrc/cuda/torch_launch.cuh makes the ops
take CPU tensors, register for the CPU key and fill outputs with NaN. Two kinds of target:
  - "ops-*": the sources of csrc/cuda/ (KERNEL_SOURCES) + csrc/dsnt_ops.cpp as a shared library
    registering the ops of docs/ops.md as torch.ops.dsnt_emu (`-Ddsnt_cuda=dsnt_emu`, so it
    cannot clash with the real extension); load it with load_ops(). Only the kernels are
    sanitized: dsnt_ops.cpp (input checks) is compiled once, plain, for all of them.
  - "selftest-*": tests/cuda_emulation/selftest.cu, a program testing the emulator itself.
One ninja file holds every target (cached, incremental, at most 2 compile jobs); build() builds
those asked for. A sanitized target runs only with its runtime preloaded: sanitizer_env().
"""

import os
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emulation"
CXX = os.environ.get("CXX", "c++")

SANITIZE = {
    "plain": [],
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
# target name -> (sanitizer, extra compile flags)
OPS_TARGETS = {
    "ops-plain": ("plain", []),
    "ops-tsan": ("tsan", []),
    "ops-asan": ("asan", []),
    # The proof that TSan sees the race the reduction barrier prevents (float kernels only: quicker).
    "ops-tsan-drop-reduction": ("tsan", ["-DDSNT_EMU_DROP_BARRIER=reduction", "-DDSNT_FLOAT_ONLY"]),
}
# Every CUDA source but build_info.cu, which reads the CUDA runtime's version macros.
CUDA = ROOT / "csrc" / "cuda"
KERNEL_SOURCES = sorted(p for p in [*CUDA.glob("*.cu"), *(CUDA / "instances").glob("*.cu")]
                        if p.name != "build_info.cu")
SELFTEST_TARGETS = [f"selftest-{s}" for s in SANITIZE]


@cache
def _torch_flags():
    import torch

    top = Path(torch.__file__).parent
    include = top / "include"
    includes = [f"-isystem {include}", f"-isystem {include / 'torch' / 'csrc' / 'api' / 'include'}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    lib = top / "lib"
    return " ".join([*includes, abi]), f"-L{lib} -Wl,-rpath,{lib} -lc10 -ltorch_cpu"


def _output(target: str) -> Path:
    return BUILD / target / ("dsnt_emu.so" if target in OPS_TARGETS else "selftest")


def _ninja_file() -> str:
    torch_cflags, torch_ldflags = _torch_flags()
    base = f"-std=c++20 -O1 -fno-fast-math -DDSNT_CUDA_EMULATION -I{ROOT / 'csrc'} -I{HERE}"
    lines = [
        f"cxx = {CXX}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $flags -x c++ -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        "  command = $cxx $in -o $out $flags",
        "",
        f"build ops/dsnt_ops.o: cxx {ROOT / 'csrc' / 'dsnt_ops.cpp'}",
        f"  flags = {base} -fPIC -Ddsnt_cuda=dsnt_emu {torch_cflags}",
    ]
    for target, (sanitizer, extra) in OPS_TARGETS.items():
        san = " ".join(SANITIZE[sanitizer] + (["-g1"] if sanitizer != "plain" else []))
        objects = []
        for source in KERNEL_SOURCES:
            objects.append(f"{target}/{source.stem}.o")
            lines += [f"build {objects[-1]}: cxx {source}",
                      f"  flags = {base} -fPIC -Ddsnt_cuda=dsnt_emu {san} {' '.join(extra)} {torch_cflags}"]
        lines += [
            f"build {target}/dsnt_emu.so: link {' '.join(objects)} ops/dsnt_ops.o",
            f"  flags = -shared {san} {torch_ldflags}",
        ]
    for sanitizer in SANITIZE:
        san = " ".join(SANITIZE[sanitizer] + ["-g1"])
        lines += [
            f"build selftest-{sanitizer}/selftest.o: cxx {HERE / 'selftest.cu'}",
            f"  flags = {base} {san}",
            f"build selftest-{sanitizer}/selftest: link selftest-{sanitizer}/selftest.o",
            f"  flags = -pthread {san}",
        ]
    return "\n".join(lines) + "\n"


def ninja() -> str:
    """The ninja next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "ninja"
    return str(local) if local.exists() else "ninja"


def build(*targets: str) -> list[Path]:
    """Builds (or finds up to date) the named targets; returns their outputs, in order."""
    BUILD.mkdir(parents=True, exist_ok=True)
    ninja_file = BUILD / "build.ninja"
    text = _ninja_file()
    if not ninja_file.exists() or ninja_file.read_text() != text:  # keep ninja's state when unchanged
        ninja_file.write_text(text)
    outputs = [_output(t) for t in targets]
    cmd = [ninja(), "-C", str(BUILD), "-j", "2"] + [str(o.relative_to(BUILD)) for o in outputs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cuda emulation build failed: {shlex.join(cmd)}\n{done.stdout[-20000:]}"
                           f"{done.stderr}")
    return outputs


def load_ops(library: Path):
    """Loads an ops library into this process; returns its op namespace (dsnt_fwd, dsnt_bwd)."""
    import torch

    torch.ops.load_library(str(library))
    return torch.ops.dsnt_emu


def _runtime(name: str) -> str:
    return subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()


def sanitizer_env(sanitizer: str) -> dict:
    """The environment a process running a `sanitizer` build needs: its runtime preloaded (a
    Python process does not link it), failing at the first report, one OpenMP thread (torch's own
    threads are not instrumented; fewer threads, less noise and time)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sanitizer == "tsan":
        env["LD_PRELOAD"] = _runtime("libtsan.so")
        env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66"
    elif sanitizer == "asan":
        # libstdc++ too: ASan must find __cxa_throw at start-up, before Python loads libstdc++.
        env["LD_PRELOAD"] = f"{_runtime('libasan.so')} {_runtime('libstdc++.so.6')}"
        env["ASAN_OPTIONS"] = "detect_leaks=0 exitcode=66"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1 halt_on_error=1"
    return env
