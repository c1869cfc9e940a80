"""Static SASS counts of the Triton kernels on sm_90, no GPU needed (docs/performance.md §4).

The real launchers run on meta tensors of the benchmark shapes with the kernel launch recorded
instead of executed; each recorded launch is compiled for GPUTarget("cuda", 90, 128) with the
argument specialization Triton's JIT would give it, disassembled with the cuobjdump Triton ships,
and measured:

- the steady state: a plan that gives a program one tile per map (the map held in registers)
  has no element loop, so its whole kernel body counts, divided by the elements a thread holds;
  otherwise the element loops are the innermost loops (a backward branch and its target) that
  load the logits, and their instructions are divided by the elements a thread handles per
  iteration (the looped forward has two such loops, one per pass over the map). Elements are
  the map's: the lanes of a power-of-two tile beyond the map (a 48-wide map in 64-wide tiles)
  count as overhead;
- `MUFU.*` among those instructions, per element;
- registers and spill bytes from `ptxas -v`, and CTAs resident per SM on an H100 / H200 (64K
  registers, 64 warps, 32 CTAs, 227 KiB of shared memory per SM).

Prints CSV (a header line unless --no-header, then rows; `--csv PATH` also writes them):
backend,kernel,dtype,direction,size_class,normalization,reg,sass_per_element,mufu_per_element,
registers,spills,ctas_per_sm. size_class is "<plan>:<benchmark shape>", plan "single" (the map
in registers, one tile) or "looped". The forward rows are the training configuration for softmax
+ JS (euclidean loss; its backward with only the loss's gradient, no target / beta gradient) and
plain coordinates + regularizer otherwise. About a minute of compiling per 20 rows.
"""

import argparse
import csv
import math
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import MockTensor

from dsnt_cuda.triton import ops

COLUMNS = ("backend", "kernel", "dtype", "direction", "size_class", "normalization", "reg",
           "sass_per_element", "mufu_per_element", "registers", "spills", "ctas_per_sm")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 128)
# Benchmark shapes of docs/performance.md: (B, L, spatial...)
SHAPES = {
    "pose2d": (32, 16, 64, 64), "lowres": (32, 16, 16, 16), "lowres3d": (32, 16, 16, 16, 16),
    "wholebody": (64, 133, 64, 48), "face": (256, 98, 64, 64), "volume3d": (16, 17, 64, 64, 64),
    "batch1": (1, 17, 64, 48),
}
NORMALIZATIONS = ("softmax", "abs", "relu", "sigmoid", "none")
REGULARIZERS = ("none", "js", "kl", "var")


class _Recorder:
    """Stands in for torch.library.wrap_triton: records kernel[grid](*args, **kwargs)."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, grid, args, kwargs))

        return Launch()


def recorded(call):
    """The kernel launches `call()` makes (on meta tensors) instead of running them."""
    recorder = _Recorder()
    saved = torch.library.wrap_triton, ops._check_device
    torch.library.wrap_triton, ops._check_device = recorder, lambda logits: None
    try:
        call()
    finally:
        torch.library.wrap_triton, ops._check_device = saved
    return recorder.launches


def record_launches(direction, shape, dtype, normalization, reg):
    """The kernel launches of one op call on meta tensors: the training configuration
    (euclidean loss, upstream gradient of the loss only) for softmax + JS, plain coordinates
    and regularizer (upstream gradients of coords and reg_losses) otherwise."""
    meta = dict(device="meta")
    batch, keypoints, n = shape[0], shape[1], len(shape) - 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.empty(shape, dtype=dtype, **meta)
    target = torch.empty((batch, keypoints, n), dtype=acc, **meta)
    training = normalization == "softmax" and reg == "js"
    options = (normalization, 1.0, True, reg, 1.0, "euclidean" if training else "none", 1.0)
    outs = []
    launches = recorded(lambda: outs.extend(ops.dsnt_fwd_triton(logits, target, None, None, None, *options)))
    if direction == "forward":
        return launches
    per_point = torch.empty((batch, keypoints, n), dtype=acc, **meta)
    per_map = torch.empty((batch, keypoints), dtype=acc, **meta)
    grads = (None, None, None, None, torch.empty((), dtype=acc, **meta)) if training else (
        per_point, None, per_map if reg != "none" else None, None, None)
    return recorded(lambda: ops.dsnt_bwd_triton(*grads, logits, target, None, None, None, outs[0], outs[1],
                                                outs[5], *options, False, False))


def compile_launch(kernel, args, kwargs):
    """Compile one recorded launch as Triton's JIT would specialize it; returns CompiledKernel."""
    names = kernel.arg_names
    constexprs = {name: kwargs[name] for name in names if name in kwargs}
    signature, attrs = {}, {}
    positional = [n for n in names if n not in kwargs]
    for name, value in zip(positional, args):
        if isinstance(value, torch.Tensor):
            value = MockTensor(value.dtype)
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = spec
            continue
        signature[name] = kind
        if spec == "D":
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {n: signature[n] for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": kwargs.get("num_warps", 4)})


def instructions(cubin: bytes):
    """[(address, opcode line)] of the SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    result = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and not m.group(2).startswith("NOP"):
            result.append((int(m.group(1), 16), m.group(2)))
    return result


def element_loops(sass):
    """Index spans [start, end] of the innermost loops that load from global memory."""
    index_of = {addr: i for i, (addr, _) in enumerate(sass)}
    loops = []
    for i, (addr, text) in enumerate(sass):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index_of:
            loops.append((index_of[int(m.group(1), 16)], i))
    loads = [(s, e) for s, e in loops if any("LDG" in t for _, t in sass[s:e + 1])]
    def encloses_another(s, e):
        return any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loads)

    return [(s, e) for s, e in loads if not encloses_another(s, e)]


def ptxas_usage(ptx: str):
    """(registers, spill bytes) of the kernel from ptxas -v (the flags Triton uses)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                              path, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True,
                             check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, (int(spill.group(1)) + int(spill.group(2))) if spill else 0


def ctas_per_sm(regs, num_warps, shared):
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = 65536 // (per_warp * num_warps)
    by_smem = (227 * 1024) // (shared + 1024)
    return max(0, min(32, 64 // num_warps, by_regs, by_smem))


def real_fraction(kwargs):
    """The share of a tile's lanes inside the map (tiles are powers of two, maps need not be)."""
    rows, cols = kwargs["SIZE_Y"] * kwargs["SIZE_Z"], kwargs["SIZE_X"]
    return (rows / (triton.cdiv(rows, kwargs["BLOCK_R"]) * kwargs["BLOCK_R"])
            * cols / (triton.cdiv(cols, kwargs["BLOCK_C"]) * kwargs["BLOCK_C"]))


def measure(kernel, args, kwargs, tiles_per_program):
    compiled = compile_launch(kernel, args, kwargs)
    sass = instructions(compiled.asm["cubin"])
    num_warps = kwargs["num_warps"]
    # per element of the map: padding lanes are work too
    per_thread = kwargs["BLOCK_R"] * kwargs["BLOCK_C"] * real_fraction(kwargs) / (32 * num_warps)
    if tiles_per_program == 1:
        body = [t for _, t in sass]
    else:
        body = [t for s, e in element_loops(sass) for _, t in sass[s:e + 1]]
    regs, spills = ptxas_usage(compiled.asm["ptx"])
    return (len(body) / per_thread, sum(t.startswith("MUFU") or " MUFU" in t for t in body) / per_thread,
            regs, spills, ctas_per_sm(regs, num_warps, compiled.metadata.shared))


def rows(configs):
    for direction, size_name, dtype, normalization, reg in configs:
        shape = SHAPES[size_name]
        launches = record_launches(direction, shape, dtype, normalization, reg)
        kernel, _, args, kwargs = next(x for x in launches if "BLOCK_R" in x[3])
        rows_per_map = kwargs["SIZE_Y"] * kwargs["SIZE_Z"]
        tiles = (triton.cdiv(rows_per_map, kwargs["BLOCK_R"])
                 * triton.cdiv(kwargs["SIZE_X"], kwargs["BLOCK_C"]))
        if direction == "backward":
            tiles = triton.cdiv(min(kwargs["CHUNK_ROWS"], rows_per_map), kwargs["BLOCK_R"]) * triton.cdiv(
                kwargs["SIZE_X"], kwargs["BLOCK_C"])
        sass, mufu, regs, spills, ctas = measure(kernel, args, kwargs, tiles)
        plan = "single" if tiles == 1 else "looped"
        yield dict(backend="triton", kernel=kernel.__name__, dtype=str(dtype).replace("torch.", ""),
                   direction=direction, size_class=f"{plan}:{size_name}", normalization=normalization,
                   reg=reg, sass_per_element=f"{sass:.1f}", mufu_per_element=f"{mufu:.2f}",
                   registers=regs, spills=spills, ctas_per_sm=ctas)


def benchmark_configs(sizes, dtypes, combos_size):
    configs = []
    for direction in ("forward", "backward"):
        for dtype in dtypes:
            for size in sizes:
                configs.append((direction, size, dtype, "softmax", "js"))
            for normalization in NORMALIZATIONS:
                for reg in REGULARIZERS:
                    if (normalization, reg) != ("softmax", "js"):
                        configs.append((direction, combos_size, dtype, normalization, reg))
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="also write the rows to this file")
    parser.add_argument("--sizes", default="lowres,pose2d,wholebody,lowres3d,volume3d",
                        help="benchmark shapes for softmax + JS (comma-separated)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--combos-size", default="pose2d",
                        help="the shape of the other normalization x reg rows ('' for none)")
    parser.add_argument("--no-header", action="store_true", help="rows only on stdout (to append them)")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    configs = benchmark_configs(args.sizes.split(","), dtypes, args.combos_size)
    if not args.combos_size:
        configs = [c for c in configs if c[3:] == ("softmax", "js")]
    writer = csv.DictWriter(sys.stdout, COLUMNS)
    if not args.no_header:
        writer.writeheader()
    out = []
    for row in rows(configs):
        writer.writerow(row)
        sys.stdout.flush()
        out.append(row)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(out)


if __name__ == "__main__":
    main()
