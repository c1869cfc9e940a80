"""Static SASS counts of the CUDA kernels, and the rows of bench/results/cuda_sass.csv.

The method (docs/performance.md §4, bench/README.md "SASS counts"): disassemble the sm_90 code
(cuobjdump -sass), build each kernel's control-flow graph, find its natural loops and count the
instructions of the steady-state one:
  - warp, block, cluster forward and both backward kernels hold a thread's elements (32 or 64)
    without an element loop: the loop is the grid-stride loop over maps, its whole body
    (per-map set-up, tables, reductions) divided by the elements a thread holds;
  - the streamed forward loops over tiles twice per map (two HBM passes): the two tile loops,
    each divided by the elements a thread takes per tile, summed.
Branches of the divergent-warp fallback (BRA.DIV) are not followed. A subroutine called in the
loop (named by nvdisasm) counts as often as it runs for a contiguous, aligned, finite map: the
per-map outputs (write_map_outputs, the group leader's) once per map, i.e. divided by the warps
of the map; the out-of-line strided loads and the math library's slow paths not at all.
`spills` counts local-memory instructions (LDL / STL) in what is counted.

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
import csv
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_objects

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ["backend", "kernel", "dtype", "direction", "size_class", "normalization", "reg",
               "sass_per_element", "mufu_per_element", "registers", "spills", "ctas_per_sm"]
NORMALIZATIONS = ("softmax", "abs", "relu", "sigmoid", "none")
REGULARIZERS = ("none", "js", "kl", "var")
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


_LABEL = re.compile(r"^(\$\S+?|\.L_\S+):\s*$")


def callee_labels(binary: Path) -> dict:
    """{kernel: {address: subroutine label}} from nvdisasm of the binary's cubins: a function the
    compiler kept out of line is `$<kernel>$<its mangled name>`, a slow path of the CUDA math
    library `$__internal_<n>_$__cuda_<what>_slowpath`."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([find_tool("cuobjdump"), "-xelf", "all", str(Path(binary).resolve())], cwd=tmp,
                       capture_output=True, check=True)
        for cubin in Path(tmp).glob("*.cubin"):
            kernel, label = None, None
            for line in run_tool("nvdisasm", "-c", str(cubin)).splitlines():
                if line.startswith(".text."):
                    kernel = line[len(".text."):].rstrip(":")
                    continue
                m = _LABEL.match(line)
                if m:
                    label = m.group(1)
                    continue
                m = _INSTR.match(line)
                if m and kernel and label and label.startswith("$"):
                    out.setdefault(kernel, {})[int(m.group(1), 16)] = label
                    label = None
    return out


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
    blocks = [ins[a:b] for a, b in zip(starts, [*starts[1:], len(ins)])]
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


_KERNEL = re.compile(r"dsnt_(fwd|bwd)(_streamed)?_kernel<([\w:]+)"
                     r"(?:, \(dsnt_cuda::FwdClass\)(\d)|, (true|false))?(?:, (true|false))?>")
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


def callee_instrs(fn: Function, start: int) -> list:
    """The instructions of the subroutine at `start`: its blocks reachable from there."""
    blocks, succ = _blocks(fn)
    first = next(n for n, b in enumerate(blocks) if b[0].addr == start)
    seen, stack = {first}, [first]
    while stack:
        n = stack.pop()
        if blocks[n][-1].opcode.startswith("RET"):
            continue
        for v in succ[n]:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return [i for n in sorted(seen) for i in blocks[n]]


def call_weight(label: str, warps_per_map: float) -> float:
    """How often a subroutine called in the loop runs, per warp and map: the per-map outputs
    (write_map_outputs) once per map, by the group's leader; the strided loads (load_tile_strided),
    the masked stores of unaligned rows (store_tile_masked) and the math library's slow paths
    (denormal or huge operands of a division, reciprocal or square root) never for contiguous,
    aligned, finite maps, the case the rows count; the math library's other routines (float64
    division) every time they are called."""
    if "write_map_outputs" in label:
        return 1.0 / warps_per_map
    if any(path in label for path in ("load_tile_strided", "store_tile_masked", "slowpath")):
        return 0.0
    if "__cuda_" in label:  # the math library's own routine (float64 division): runs every time
        return 1.0
    raise RuntimeError(f"a call in the counted loop to an unknown subroutine: {label}")


def count(kernel: Kernel, elements: int, labels: dict, warps_per_map: float) -> Count:
    """Per-element instructions of the kernel's steady-state loop(s), see the module docstring."""
    loops = sorted(natural_loops(kernel.fn), key=lambda loop: -len(loop_instrs(loop)))
    if not loops:
        raise RuntimeError(f"{kernel.mangled}: no loop found")
    outer = loops[0]
    if kernel.size_class == "streamed":
        inner = [loop for loop in loops[1:] if loop[1] <= outer[1]
                 and any(i.opcode.startswith("LDG") for i in loop_instrs(loop))][:2]
        body = [i for loop in inner for i in loop_instrs(loop)]
    else:
        body = loop_instrs(outer)
    weighted = [(i, 1.0) for i in body]
    for call in (i for i in body if i.opcode.startswith("CALL")):
        w = call_weight(labels.get(call.target, f"<{call.target:#x}>"), warps_per_map)
        if w:
            weighted += [(i, w) for i in callee_instrs(kernel.fn, call.target)]
    sass = sum(w for _, w in weighted)
    mufu = sum(w for i, w in weighted if i.opcode.startswith("MUFU"))
    spills = sum(i.opcode.startswith(("LDL", "STL")) for i, _ in weighted)
    return Count(sass / elements, mufu / elements, spills)


def plan_key(k: Kernel) -> str:
    """The planner's name of the kernel (cuda_objects.PLAN_KERNELS)."""
    return ("fwd_" if k.direction == "forward" else "bwd_") + k.size_class


def register_map(binary: Path, dtype: str) -> dict:
    """{"fwd_block": registers, ...} of the standard-loss kernels of `dtype` in `binary` (the
    general ones where a dtype has no standard kernel)."""
    kernels = kernels_of(parse_sass(run_tool("cuobjdump", "-sass", str(binary))))
    regs = resources(binary)
    return {plan_key(k): regs.get(k.mangled, 0) for k in sorted(kernels, key=lambda k: k.standard)
            if k.dtype == dtype}


def rows_of(binary: Path, modes=None) -> list:
    """CSV rows of every dsnt kernel in `binary`; `modes` labels a probe build's kernels."""
    funcs = parse_sass(run_tool("cuobjdump", "-sass", str(binary)))
    kernels = kernels_of(funcs)
    regs = resources(binary)
    labels = callee_labels(binary)
    rows = []
    for k in kernels:
        if modes is None and not k.standard:
            normalization = reg = "any"  # the production kernel for every other mode: see --probes
        elif modes is None:
            normalization, reg = "softmax", "js"
        else:
            normalization, reg = modes
        shape = PLAN_SHAPES[(k.direction, k.size_class)]
        plan = cuda_objects.launch_plan(shape, ELEM_SIZE[k.dtype], k.direction == "backward",
                                        {plan_key(k): regs.get(k.mangled, 0)})
        warps_per_map = plan["threads"] / 32 / plan["maps_per_cta"] * plan["ctas_per_map"]
        c = count(k, plan["elements_per_thread"], labels.get(k.mangled, {}), warps_per_map)
        rows.append({"backend": "cuda", "kernel": k.mangled, "dtype": k.dtype, "direction": k.direction,
                     "size_class": k.size_class, "normalization": normalization, "reg": reg,
                     "sass_per_element": round(c.sass, 2), "mufu_per_element": round(c.mufu, 3),
                     "registers": regs.get(k.mangled, ""), "spills": c.spills,
                     "ctas_per_sm": plan["ctas_per_sm"]})
    return rows


def binaries(parallel: int) -> list:
    """What the ops run: the built extension's library, else the production objects (nvcc)."""
    lib = cuda_objects.extension_library()
    return [lib] if lib else cuda_objects.production_objects(parallel)


def standard_rows(parallel: int) -> list:
    """Rows of the float32 standard-loss kernels (the budget test): from the built extension,
    else from a quick build of those kernels only."""
    lib = cuda_objects.extension_library()
    found = rows_of(lib) if lib else [r for o in cuda_objects.standard_objects(parallel) for r in rows_of(o)]
    return [r for r in found
            if r["dtype"] == "float32" and r["normalization"] == "softmax" and r["reg"] == "js"]


def write_csv(rows: list, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def print_rows(rows: list):
    print(f"{'direction':9} {'class':9} {'dtype':9} {'normalization':13} {'reg':4} {'SASS/el':>8} "
          f"{'MUFU/el':>8} {'regs':>5} {'spills':>6} {'CTAs/SM':>7}")
    for r in rows:
        print(f"{r['direction']:9} {r['size_class']:9} {r['dtype']:9} {r['normalization']:13} {r['reg']:4} "
              f"{r['sass_per_element']:8.2f} {r['mufu_per_element']:8.3f} {r['registers']:>5} "
              f"{r['spills']:>6} {r['ctas_per_sm']:>7}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", type=Path,
                        help="object or library to count (default: the built extension, else the "
                        "production objects)")
    parser.add_argument("--probes", action="store_true",
                        help="also compile and count every other mode (slow)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--csv", type=Path, help="write the rows there")
    args = parser.parse_args(argv)
    rows = [r for b in ([args.binary] if args.binary else binaries(args.jobs)) for r in rows_of(b)]
    if args.probes:
        modes = [(n, r) for n in NORMALIZATIONS for r in REGULARIZERS if (n, r) != ("softmax", "js")]
        for mode, obj in cuda_objects.probe_objects(modes, args.jobs).items():
            rows += rows_of(obj, mode)
    rows.sort(key=lambda r: (r["direction"], r["size_class"], r["dtype"], r["normalization"] != "softmax",
                             r["normalization"], r["reg"]))
    print_rows(rows)
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
