"""The nvcc builds behind the CUDA report (scripts/sass_count.py, tests/test_cuda_sass.py) and the
launch planner it asks (csrc/cuda/launch_plan.cu, through ctypes).

Objects are compiled for sm_90 with the extension's own flags (setup.py) and cached under
build/sass_probes/<digest>/, the digest of every CUDA source and header (csrc/cuda/, dsnt_math.h):
a build is redone only when a source changed. At most `jobs` nvcc processes at once.

  - production objects: csrc/cuda/instances/*.cu as they are, i.e. the kernels the ops launch
    (when the extension is built, its library is read instead: the same kernels);
  - standard objects: only the float32 standard-loss kernels (softmax + JS) of every size class,
    the budget test's quick build;
  - probe objects: the general kernels with one normalization x regularizer fixed at compile time
    (DSNT_PROBE_NORMALIZATION / DSNT_PROBE_REG), so the disassembly holds what runs for that mode;
  - the planner: the `dsnt_cuda_launch_plan_json` entry of the built extension, else
    launch_plan.cu alone built as a small host library.
"""

import concurrent.futures
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
MODE_NAMES = {"softmax": "Softmax", "abs": "Abs", "relu": "Relu", "sigmoid": "Sigmoid", "none": "None",
              "js": "JS", "kl": "KL", "var": "Var"}
# The registers argument of the planner, in its KernelRegisters order.
PLAN_KERNELS = ["fwd_warp", "fwd_block", "fwd_cluster", "fwd_streamed", "bwd_warp", "bwd_block"]


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(home) if home.exists() else None


def _torch_paths():
    import torch
    import torch.utils.cpp_extension as ext

    try:
        includes = ext.include_paths(device_type="cuda")
    except TypeError:
        includes = ext.include_paths(cuda=True)
    return includes, Path(torch.__file__).parent / "lib", int(torch._C._GLIBCXX_USE_CXX11_ABI)


def nvcc_command(source: Path, output: Path, defines=(), shared=False) -> list:
    includes, lib, abi = _torch_paths()
    cuda_home = Path(nvcc()).resolve().parents[1]
    arch = os.environ.get("CUDA_ARCH", "90")
    cmd = [nvcc(), "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DDSNT_WITH_CUDA=1",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           f"-I{ROOT / 'csrc'}", f"-I{CUDA_SOURCES}",
           *[f"-I{p}" for p in includes], f"-I{cuda_home / 'include'}", *[f"-D{d}" for d in defines],
           "-Xcompiler", "-fPIC"]
    if shared:
        link = [f"-L{lib}", "-lc10", f"-Xlinker=-rpath={lib}"]
        return [*cmd, "-shared", str(source), "-o", str(output), *link]
    return [*cmd, "-c", str(source), "-o", str(output)]


@cache
def build_dir() -> Path:
    h = hashlib.sha256()
    for p in sorted([*CUDA_SOURCES.rglob("*"), ROOT / "csrc" / "dsnt_math.h"]):
        if p.suffix in (".h", ".cuh", ".cu"):
            h.update(p.relative_to(ROOT).as_posix().encode() + p.read_bytes())
    out = ROOT / "build" / "sass_probes" / h.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    return out


def _compile(job) -> Path:
    source, output, defines, shared = job
    if output.exists():
        return output
    partial = output.with_name(output.name + ".partial")
    done = subprocess.run(nvcc_command(source, partial, defines, shared), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} {' '.join(defines)}:\n{done.stderr[-4000:]}")
    partial.rename(output)
    return output


def compile_all(jobs: list, parallel: int) -> list:
    """jobs: (source, output, defines, shared); the outputs, built at most `parallel` at once."""
    if nvcc() is None:
        raise RuntimeError("nvcc not found (PATH or CUDA_HOME)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(_compile, jobs))


def _source(name: str, text: str) -> Path:
    path = build_dir() / f"{name}.cu"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def production_objects(parallel: int, dtypes=("f32", "bf16", "f16", "f64")) -> list:
    sources = sorted(p for p in (CUDA_SOURCES / "instances").glob("*.cu")
                     if p.stem.rsplit("_", 1)[1] in dtypes)
    return compile_all([(s, build_dir() / f"{s.stem}.o", (), False) for s in sources], parallel)


_PROBE = """// A SASS probe (scripts/cuda_objects.py): {what}, float32.
#include "launcher_impl.cuh"
namespace dsnt_cuda {{
{instances}}}  // namespace dsnt_cuda
"""


def _probe_source(name: str, what: str, kernels: list, standard: bool) -> Path:
    flag = "true" if standard else "false"
    text = "".join(f"template struct Launcher<SizeClass::{cls}, {str(bwd).lower()}, {flag}, float>;\n"
                   for cls, bwd in kernels)
    return _source(name, _PROBE.format(what=what, instances=text))


FORWARD = [("Warp", False), ("Block", False), ("Cluster", False), ("Streamed", False)]
BACKWARD = [("Warp", True), ("Block", True)]


def standard_objects(parallel: int) -> list:
    """The float32 standard-loss kernels of every size class, forward and backward objects."""
    jobs = [(_probe_source(f"standard-{d}", "the standard-loss kernels", ks, True),
             build_dir() / f"standard-{d}.o", ("DSNT_FLOAT_ONLY",), False)
            for d, ks in (("fwd", FORWARD), ("bwd", BACKWARD))]
    return compile_all(jobs, parallel)


def probe_objects(modes: list, parallel: int) -> dict:
    """{(normalization, reg): object} of the general kernels with that mode fixed."""
    source = _probe_source("probe", "the general kernels, one mode fixed", FORWARD + BACKWARD, False)
    jobs = [(source, build_dir() / f"probe-{n}-{r}.o",
             ("DSNT_FLOAT_ONLY", f"DSNT_PROBE_NORMALIZATION={MODE_NAMES[n]}",
              f"DSNT_PROBE_REG={MODE_NAMES[r]}"), False)
            for n, r in modes]
    return dict(zip(modes, compile_all(jobs, parallel)))


def extension_library() -> Path | None:
    """The built extension's library when it holds the CUDA kernels."""
    for lib in sorted((ROOT / "dsnt_cuda").glob("_C*.so")):
        if b"dsnt_cuda_launch_plan_json" in lib.read_bytes():
            return lib
    return None


@cache
def _planner():
    import torch  # noqa: F401  (loads libc10 for the library)

    planner_job = (CUDA_SOURCES / "launch_plan.cu", build_dir() / "launch_plan.so", (), True)
    lib = extension_library() or compile_all([planner_job], 1)[0]
    fn = ctypes.CDLL(str(lib)).dsnt_cuda_launch_plan_json
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                   ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
    return fn


def launch_plan(shape, elem_size: int, backward: bool, registers: dict, sms=132, max_cluster=16) -> dict:
    """The ops' plan for contiguous logits of `shape` (B, L, *spatial) on a modelled H100 / H200
    whose kernels use `registers` ({"fwd_block": 128, ...}; missing: 64)."""
    spatial = (ctypes.c_int64 * 3)(*shape[2:])
    regs = (ctypes.c_int * len(PLAN_KERNELS))(*[registers.get(k, 0) for k in PLAN_KERNELS])
    text = _planner()(shape[0], shape[1], len(shape) - 2, spatial, elem_size, int(backward), regs, sms,
                      max_cluster)
    plan = json.loads(text.decode())
    if "error" in plan:
        raise ValueError(f"launch plan of {tuple(shape)}: {plan['error']}")
    return plan
