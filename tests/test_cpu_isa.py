"""The built extension runs on any x86-64 CPU: AVX2 code only where a CPU check guards it.

csrc/cpu/dsnt_cpu_kernels_avx2.cpp compiles the CPU kernels for AVX2 + FMA with `#pragma GCC target`
while every other unit is portable. Inline functions that several units instantiate (std::vector,
c10 helpers, ...) are merged by the linker into one copy; if the AVX2 unit's copy won, portable
code would execute AVX2 instructions and die with SIGILL on a CPU without AVX2. This disassembles
the extension and checks that VEX instructions (AVX / AVX2 / FMA, any `v...` mnemonic or ymm
register) occur only in the AVX2 namespace and in `kernels_avx2()`, which dsnt_cpu_host.cpp calls
only after the CPU check.
"""

import platform
import re
import shutil
import subprocess

import pytest

from dsnt_cuda import _extension

# Functions allowed to hold AVX2 code: the avx2 build of the kernels, at::vec's AVX2 classes, and
# the entry point that returns their table.
AVX2_ALLOWED = re.compile(r"dsnt_cuda::cpu::avx2::|at::vec::AVX2::|dsnt_cuda::cpu::kernels_avx2\(\)")
VEX_INSTRUCTION = re.compile(r"%[yz]mm\d|\tv[a-z0-9]+\s")
FUNCTION_HEADER = re.compile(r"^[0-9a-f]+ <(.*)>:$")

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2 build exists on x86-64 only"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump"),
    pytest.mark.skipif(not _extension.extension_loaded(), reason="the extension is not built"),
]


def functions_with_vex(library: str) -> dict[str, str]:
    """{demangled function name: its first VEX instruction} over the library's code."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", library],
        check=True, capture_output=True, text=True,
    ).stdout
    found, name = {}, None
    for line in listing.splitlines():
        header = FUNCTION_HEADER.match(line)
        if header:
            name = header.group(1)
        elif name is not None and name not in found and VEX_INSTRUCTION.search(line):
            found[name] = line.strip()
    return found


def test_avx2_code_stays_behind_the_cpu_check():
    vex = functions_with_vex(_extension._C.__file__)
    # The check must see the AVX2 kernels themselves, or it proves nothing.
    assert any("dsnt_cuda::cpu::avx2::forward_map" in name for name in vex), sorted(vex)[:10]
    leaked = {name: insn for name, insn in vex.items() if not AVX2_ALLOWED.search(name)}
    assert not leaked, (
        "AVX2 instructions in functions that portable code may call (the portable unit must link first): "
        + "; ".join(f"{name}: {insn}" for name, insn in sorted(leaked.items())[:10])
    )
