"""Static SASS counts of the CUDA kernels, and the rows of bench/results/cuda_sass.csv.

The method (docs/performance.md §4, bench/README.md "SASS counts"): disassemble the sm_90 code
(cuobjdump -sass), build each kernel's control-flow graph, find its natural loops and count the
instructions of the steady-state one:
  - warp, block, cluster forward and both backward kernels hold a thread's elements (32 or 64)
    without an element loop: the loop is the grid-stride loop over maps, its whole body
    (per-map set-up, tables, reductions) divided by the elements a thread holds;
  - the streamed forward loops over tiles twice per map (two HBM passes): the two tile loops,
    each divided by the elements a thread takes per tile, summed.
Branches of the divergent-warp fallback (BRA.DIV) and calls (the per-map epilogue one thread
runs, the out-of-line loads of unaligned maps) are not followed. `spills` counts local-memory
instructions (LDL / STL) in the counted loop.

What runs: the production build holds, per size class and dtype, a kernel specialised for the
standard loss (softmax + JS, no target / beta gradient, no variance upstream), which the ops
launch for it, and a kernel for every other mode; the first is counted as is. The other modes
are counted in probe builds (--probes), which fix the normalization and regularizer at compile
time (DSNT_PROBE_NORMALIZATION / DSNT_PROBE_REG) so that the disassembly holds exactly the
instructions that run for that mode.

    python scripts/sass_count.py                       # the built extension: every kernel
    python scripts/sass_count.py --probes --csv OUT    # + probe builds of every mode (slow)
"""

import argparse
import concurrent.futures
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ["backend", "kernel", "dtype", "direction", "size_class", "normalization", "reg", "sass_per_element",
               "mufu_per_element", "registers", "spills", "ctas_per_sm"]
NORMALIZATIONS = ("softmax", "abs", "relu", "sigmoid", "none")
REGULARIZERS = ("none", "js", "kl", "var")
CPP_NAMES = {"softmax": "Softmax", "abs": "Abs", "relu": "Relu", "sigmoid": "Sigmoid", "none": "None",
             "js": "JS", "kl": "KL", "var": "Var"}
DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
ELEM_SIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
# A shape per (direction, class) whose launch plan gives the class's CTAs per SM and the
# elements a thread holds (x last; the plan comes from the ops' own planner, dsnt_cuda._C).
PLAN_SHAPES = {("forward", "warp"): (32, 16, 16, 16), ("forward", "block"): (32, 16, 64, 64),
               ("forward", "cluster"): (16, 17, 64, 64, 64), ("forward", "streamed"): (1, 1, 128, 128, 128),
               ("backward", "warp"): (32, 16, 16, 16), ("backward", "block"): (32, 16, 64, 64)}


def find_tool(name: str) -> str | None:
    """cuobjdump: on PATH, in the CUDA toolkit, or the copy triton ships."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


# ---------------------------------------------------------------------------------------------
# Disassembly and control flow


@dataclass
class Instr:
    addr: int
    opcode: str  # e.g. "MUFU.EX2", "BRA"
    text: str
    target: int | None = None  # branch target


@dataclass
class Function:
    name: str
    instrs: list = field(default_factory=list)


_FUNC = re.compile(r"^\s*Function : (\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_TARGET = re.compile(r"\b(?:BRA|BRX|JMP|CALL\.REL(?:\.NOINC)?)\b[^;]*?(0x[0-9a-f]+)")


def parse_sass(text: str) -> dict:
    """{mangled name: Function} from `cuobjdump -sass` output."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            body = m.group(2).strip()
            words = body.split()
            op = words[1] if words[0].startswith("@") else words[0]
            t = _TARGET.search(body)
            cur.instrs.append(Instr(int(m.group(1), 16), op, body, int(t.group(1), 16) if t else None))
    return funcs


def run_tool(tool: str, *args) -> str:
    path = find_tool(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found (CUDA toolkit or triton)")
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def _blocks(fn: Function):
    """Basic blocks and successors. BRA.DIV (the fallback a compiler emits for warp collectives
    in case the warp is not converged, which the kernels never are at one) is not followed: its
    blocks are unreachable and count in no loop. CALLs return: they are not edges."""
    ins = fn.instrs
    index = {i.addr: k for k, i in enumerate(ins)}
    leaders = {0}
    for k, i in enumerate(ins):
        if i.opcode.startswith(("BRA", "EXIT", "RET", "BRX", "JMX")):
            if k + 1 < len(ins):
                leaders.add(k + 1)
            if i.target in index and not i.opcode.startswith("BRA.DIV"):
                leaders.add(index[i.target])
    starts = sorted(leaders)
    blocks = [ins[a:b] for a, b in zip(starts, starts[1:] + [len(ins)])]
    block_at = {blk[0].addr: n for n, blk in enumerate(blocks)}
    succ = []
    for n, blk in enumerate(blocks):
        last, out = blk[-1], []
        conditional = last.text.startswith("@") or re.match(r"BRA\S*\s+!?U?P\d", last.text) is not None
        if last.opcode.startswith("BRA") and not last.opcode.startswith("BRA.DIV"):
            if last.target in block_at:
                out.append(block_at[last.target])
            if conditional and n + 1 < len(blocks):
                out.append(n + 1)
        elif last.opcode.startswith(("EXIT", "RET", "BRX", "JMX")):
            if last.text.startswith("@") and n + 1 < len(blocks):
                out.append(n + 1)
        elif n + 1 < len(blocks):
            out.append(n + 1)
        succ.append(out)
    return blocks, succ


def natural_loops(fn: Function) -> list:
    """[(header address, set of block indices, blocks)] of every back edge (merged per header)."""
    blocks, succ = _blocks(fn)
    pred = [[] for _ in blocks]
    for u, outs in enumerate(succ):
        for v in outs:
            pred[v].append(u)
    reach, stack = {0}, [0]
    while stack:
        for v in succ[stack.pop()]:
            if v not in reach:
                reach.add(v)
                stack.append(v)
    dom = {b: set(reach) for b in reach}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(reach - {0}):
            ps = [dom[p] for p in pred[b] if p in reach]
            new = set.intersection(*ps) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    found = {}
    for u in reach:
        for h in succ[u]:
            if h in dom[u]:  # back edge u -> h
                body, stack = {h, u}, ([u] if u != h else [])
                while stack:
                    for p in pred[stack.pop()]:
                        if p in reach and p not in body:
                            body.add(p)
                            stack.append(p)
                found.setdefault(h, set()).update(body)
    return [(blocks[h][0].addr, body, blocks) for h, body in found.items()]


def loop_instrs(loop) -> list:
    _, body, blocks = loop
    return [i for b in sorted(body) for i in blocks[b]]


# ---------------------------------------------------------------------------------------------
# The kernels of csrc/cuda/


@dataclass
class Kernel:
    mangled: str
    direction: str   # forward / backward
    size_class: str  # warp / block / cluster / streamed
    dtype: str
    standard: bool   # the softmax + JS specialisation
    fn: Function = None


_KERNEL = re.compile(r"dsnt_(fwd|bwd)(_streamed)?_kernel<([\w:]+)(?:, \(dsnt_cuda::FwdClass\)(\d)|, (true|false))?"
                     r"(?:, (true|false))?>")
_FWD_CLASSES = {"0": "warp", "1": "block", "2": "cluster"}


def demangle(names: list) -> list:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def kernels_of(funcs: dict) -> list:
    names = list(funcs)
    found = []
    for mangled, pretty in zip(names, demangle(names)):
        m = _KERNEL.search(pretty)
        if m is None or m.group(3) not in DTYPES:
            continue
        direction = "forward" if m.group(1) == "fwd" else "backward"
        if m.group(2):
            cls, standard = "streamed", m.group(5) == "true"
        elif direction == "forward":
            cls, standard = _FWD_CLASSES[m.group(4)], m.group(6) == "true"
        else:
            cls, standard = ("warp" if m.group(5) == "true" else "block"), m.group(6) == "true"
        found.append(Kernel(mangled, direction, cls, DTYPES[m.group(3)], standard, funcs[mangled]))
    return found


def resources(binary: Path) -> dict:
    """{mangled name: registers} from cuobjdump -res-usage."""
    regs, name = {}, None
    for line in run_tool("cuobjdump", "-res-usage", str(binary)).splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+)", line)
        if m and name:
            regs[name] = int(m.group(1))
    return regs


@dataclass
class Count:
    sass: float
    mufu: float
    spills: int


def count(kernel: Kernel, elements: int) -> Count:
    """Per-element instructions of the kernel's steady-state loop(s), see the module docstring."""
    loops = sorted(natural_loops(kernel.fn), key=lambda l: -len(loop_instrs(l)))
    if not loops:
        raise RuntimeError(f"{kernel.mangled}: no loop found")
    outer = loops[0]
    if kernel.size_class == "streamed":
        inner = [l for l in loops[1:] if l[1] <= outer[1]
                 and any(i.opcode.startswith("LDG") for i in loop_instrs(l))][:2]
        body = [i for l in inner for i in loop_instrs(l)]
    else:
        body = loop_instrs(outer)
    mufu = sum(i.opcode.startswith("MUFU") for i in body)
    spills = sum(i.opcode.startswith(("LDL", "STL")) for i in body)
    return Count(len(body) / elements, mufu / elements, spills)


def launch_plan(shape, elem_size, backward, registers, sms=132, max_cluster=16) -> dict:
    """The plan of the ops' own planner (csrc/cuda/launch_plan.cu) through dsnt_cuda._C."""
    sys.path.insert(0, str(ROOT))
    from dsnt_cuda import _extension

    if _extension._C is None or not hasattr(_extension._C, "cuda_launch_plan"):
        raise RuntimeError(f"dsnt_cuda._C with CUDA is needed for launch plans: {_extension.LOAD_ERROR}")
    text = _extension._C.cuda_launch_plan(shape[0], shape[1], list(shape[2:]), elem_size, backward, registers, sms,
                                          max_cluster)
    return json.loads(text)


def register_map(kernels: list, regs: dict, dtype: str) -> dict:
    """{"fwd_block": registers, ...} of the kernels the ops launch for the standard loss."""
    out = {}
    for k in kernels:
        if k.dtype == dtype and k.standard:
            out[("fwd_" if k.direction == "forward" else "bwd_") + k.size_class] = regs.get(k.mangled, 64)
    return out


def rows_of(binary: Path, modes=None) -> list:
    """CSV rows of every dsnt kernel in `binary`; `modes` labels a probe build's kernels."""
    funcs = parse_sass(run_tool("cuobjdump", "-sass", str(binary)))
    kernels = kernels_of(funcs)
    regs = resources(binary)
    rows = []
    for k in kernels:
        if modes is None and not k.standard:
            normalization = reg = "any"  # the production kernel for every other mode: see --probes
        elif modes is None:
            normalization, reg = "softmax", "js"
        else:
            normalization, reg = modes
        shape = PLAN_SHAPES[(k.direction, k.size_class)]
        plan = launch_plan(shape, ELEM_SIZE[k.dtype], k.direction == "backward",
                           {("fwd_" if k.direction == "forward" else "bwd_") + k.size_class: regs.get(k.mangled, 64)})
        elements = plan["elements_per_thread"]
        c = count(k, elements)
        rows.append({"backend": "cuda", "kernel": k.mangled, "dtype": k.dtype, "direction": k.direction,
                     "size_class": k.size_class, "normalization": normalization, "reg": reg,
                     "sass_per_element": round(c.sass, 2), "mufu_per_element": round(c.mufu, 3),
                     "registers": regs.get(k.mangled, ""), "spills": c.spills, "ctas_per_sm": plan["ctas_per_sm"]})
    return rows


# ---------------------------------------------------------------------------------------------
# Probe builds: one object per (normalization, reg), float32, the modes fixed at compile time


def nvcc_command(source: Path, output: Path, defines: list) -> list:
    import torch
    import torch.utils.cpp_extension as ext

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = shutil.which("nvcc") or str(Path(cuda_home) / "bin" / "nvcc")
    try:
        includes = ext.include_paths(device_type="cuda")
    except TypeError:
        includes = ext.include_paths(cuda=True)
    arch = os.environ.get("CUDA_ARCH", "90")
    return [nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DDSNT_WITH_CUDA=1", "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            f"-I{ROOT / 'csrc'}", *[f"-I{p}" for p in includes], f"-I{Path(cuda_home) / 'include'}",
            *[f"-D{d}" for d in defines], "-Xcompiler", "-fPIC", "-c", str(source), "-o", str(output)]


PROBE_SOURCE = """// A SASS probe (scripts/sass_count.py): the general kernel of every size class of both
// directions, float32, one mode fixed at compile time.
#include "launcher_impl.cuh"
namespace dsnt_cuda {
template struct Launcher<SizeClass::Warp, false, false, float>;
template struct Launcher<SizeClass::Block, false, false, float>;
template struct Launcher<SizeClass::Cluster, false, false, float>;
template struct Launcher<SizeClass::Streamed, false, false, float>;
template struct Launcher<SizeClass::Warp, true, false, float>;
template struct Launcher<SizeClass::Block, true, false, float>;
}  // namespace dsnt_cuda
"""


def sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "csrc").rglob("*")):
        if p.suffix in (".h", ".cuh", ".cu") and "cpu" not in p.parts:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def probe_objects(modes: list, jobs: int) -> dict:
    """{(normalization, reg): object} for the probe builds, cached under build/sass_probes/ by
    a digest of the CUDA sources (rebuilt only when they change)."""
    out_dir = ROOT / "build" / "sass_probes" / sources_digest()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "probe.cu"
    source.write_text(PROBE_SOURCE)

    def build(mode):
        obj = out_dir / f"{mode[0]}-{mode[1]}.o"
        if not obj.exists():
            defines = ["DSNT_FLOAT_ONLY", f"DSNT_PROBE_NORMALIZATION={CPP_NAMES[mode[0]]}",
                       f"DSNT_PROBE_REG={CPP_NAMES[mode[1]]}"]
            done = subprocess.run(nvcc_command(source, obj.with_suffix(".tmp.o"), defines), capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise RuntimeError(f"probe {mode} failed:\n{done.stderr[-4000:]}")
            obj.with_suffix(".tmp.o").rename(obj)
        return mode, obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(build, modes))


def extension_binary() -> Path | None:
    found = sorted((ROOT / "dsnt_cuda").glob("_C*.so"))
    return found[0] if found else None


def write_csv(rows: list, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def print_rows(rows: list):
    print(f"{'direction':9} {'class':9} {'dtype':9} {'normalization':13} {'reg':4} {'SASS/el':>8} {'MUFU/el':>8} "
          f"{'regs':>5} {'spills':>6} {'CTAs/SM':>7}")
    for r in rows:
        print(f"{r['direction']:9} {r['size_class']:9} {r['dtype']:9} {r['normalization']:13} {r['reg']:4} "
              f"{r['sass_per_element']:8.2f} {r['mufu_per_element']:8.3f} {r['registers']:>5} {r['spills']:>6} "
              f"{r['ctas_per_sm']:>7}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", type=Path, help="object or library to count (default: the built extension)")
    parser.add_argument("--probes", action="store_true", help="also compile and count every other mode (slow)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--csv", type=Path, help="write the rows there")
    args = parser.parse_args(argv)
    binary = args.binary or extension_binary()
    if binary is None:
        sys.exit("sass_count: no built extension (make build) and no --binary")
    rows = rows_of(binary)
    if args.probes:
        modes = [(n, r) for n in NORMALIZATIONS for r in REGULARIZERS if (n, r) != ("softmax", "js")]
        for mode, obj in probe_objects(modes, args.jobs).items():
            rows += rows_of(obj, mode)
    rows.sort(key=lambda r: (r["direction"], r["size_class"], r["dtype"], r["normalization"] != "softmax",
                             r["normalization"], r["reg"]))
    print_rows(rows)
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
