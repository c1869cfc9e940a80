"""Static SASS counts of the CUDA kernels (docs/performance.md §4); see bench/README.md.

Library + command line: `python scripts/sass_count.py BINARY` prints every kernel's loops.
"""

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON_BIN = "lib/python3.11/site-packages/triton/backends/nvidia/bin"


def find_tool(name: str) -> str | None:
    """cuobjdump / nvdisasm: on PATH, in the CUDA toolkit, or the copy triton ships."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path("/usr/local/cuda/bin") / name, ROOT / ".venv" / TRITON_BIN / name]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


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
            op = body.split()[0]
            if op.startswith("@"):  # predicate guard
                op = body.split()[1]
            t = _TARGET.search(body)
            cur.instrs.append(Instr(int(m.group(1), 16), op, body, int(t.group(1), 16) if t else None))
    return funcs


def disassemble(binary: Path) -> dict:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton)")
    out = subprocess.run([tool, "-sass", str(binary)], capture_output=True, text=True, check=True).stdout
    return parse_sass(out)


def _blocks(fn: Function):
    """Basic blocks (lists of instructions) and the successor indices of each.

    BRA.DIV (the fallback a compiler emits for warp collectives in case the warp is not
    converged, which the kernels never are when they reach one) is not followed: its blocks are
    unreachable here and count in no loop. CALLs return: they are not edges.
    """
    ins = fn.instrs
    addr_index = {i.addr: k for k, i in enumerate(ins)}
    leaders = {0}
    for k, i in enumerate(ins):
        if i.opcode.startswith(("BRA", "EXIT", "RET", "BRX", "JMX")):
            if k + 1 < len(ins):
                leaders.add(k + 1)
            if i.target is not None and i.target in addr_index and not i.opcode.startswith("BRA.DIV"):
                leaders.add(addr_index[i.target])
    starts = sorted(leaders)
    blocks = [ins[a:b] for a, b in zip(starts, starts[1:] + [len(ins)])]
    block_of = {blk[0].addr: n for n, blk in enumerate(blocks)}
    succ = []
    for n, blk in enumerate(blocks):
        last = blk[-1]
        guarded = last.text.startswith("@")
        out = []
        op = last.opcode
        if op.startswith("BRA") and not op.startswith("BRA.DIV"):
            if last.target in block_of:
                out.append(block_of[last.target])
            if (guarded or " P" in last.text.split(",")[0]) and n + 1 < len(blocks):
                out.append(n + 1)
        elif op.startswith(("EXIT", "RET", "BRX", "JMX")):
            if guarded and n + 1 < len(blocks):
                out.append(n + 1)
        elif n + 1 < len(blocks):
            out.append(n + 1)
        succ.append(out)
    return blocks, succ


def natural_loops(fn: Function) -> list:
    """The natural loops of the function: (header address, set of block indices, blocks)."""
    blocks, succ = _blocks(fn)
    n = len(blocks)
    pred = [[] for _ in range(n)]
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
                    x = stack.pop()
                    for p in pred[x]:
                        if p in reach and p not in body:
                            body.add(p)
                            stack.append(p)
                found.setdefault(h, set()).update(body)
    return [(blocks[h][0].addr, body, blocks) for h, body in found.items()]


def loop_instrs(loop) -> list:
    _, body, blocks = loop
    return [i for b in sorted(body) for i in blocks[b]]


if __name__ == "__main__":
    for name, fn in disassemble(Path(sys.argv[1])).items():
        print(name, len(fn.instrs))
        for loop in sorted(natural_loops(fn), key=lambda l: -len(loop_instrs(l))):
            body = loop_instrs(loop)
            print(f"  loop at {loop[0]:#x}: {len(body)} instrs, {sum(i.opcode.startswith('MUFU') for i in body)} MUFU")
