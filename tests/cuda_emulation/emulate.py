"""Builds csrc/cuda/dsnt_kernel.cu as host C++ over shim.h, so its kernels run without a GPU.

The CUDA source is used as it is, with a few mechanical rewrites (each must match, or the build
stops and says which): the CUDA runtime includes become shim.h, dynamic shared memory comes from
the shim, the launch syntax `kernel<<<grid, threads, smem, stream>>>(a)` becomes
`emu_launch(grid.x, threads, smem, [&] { kernel(a); })`, the CUDA-only host lines (device guard,
stream, launch check, dispatch registration) go, and outputs are filled with NaN instead of left
uninitialized, so an unwritten element shows. csrc/dsnt_ops.cpp (the shared input checks) is
compiled alongside without its op registration, in namespace dsnt_emu, so the module cannot
clash with the real extension. `load()` returns a module with fwd(...) and bwd(...), the
arguments and results of dsnt_fwd / dsnt_bwd (csrc/OPS.md).
"""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

BINDINGS = """
#include <torch/extension.h>
namespace dsnt_cuda {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_fwd(
    const at::Tensor& logits, const std::optional<at::Tensor>& target, std::string normalization,
    double beta, bool normalized, std::string reg, double sigma) {
  return dsnt_fwd_cuda(logits, target, normalization, beta, normalized, reg, sigma);
}
std::tuple<at::Tensor, at::Tensor> emu_bwd(
    const std::optional<at::Tensor>& gc, const std::optional<at::Tensor>& gv,
    const std::optional<at::Tensor>& gr, const at::Tensor& logits,
    const std::optional<at::Tensor>& target, const at::Tensor& coords, const at::Tensor& variance,
    const at::Tensor& stats, std::string normalization, double beta, bool normalized,
    std::string reg, double sigma, bool needs_target_grad) {
  return dsnt_bwd_cuda(gc, gv, gr, logits, target, coords, variance, stats, normalization, beta,
                       normalized, reg, sigma, needs_target_grad);
}
}  // namespace dsnt_cuda
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &dsnt_cuda::emu_fwd);
  m.def("bwd", &dsnt_cuda::emu_bwd);
}
"""


def _rewrite(text: str, pattern: str, replacement: str, expected: int, flags=0) -> str:
    new, count = re.subn(pattern, replacement, text, flags=flags)
    if count != expected:
        raise RuntimeError(
            f"cuda emulation: rewrite {pattern!r} matched {count} times, expected {expected}: "
            "csrc/cuda/dsnt_kernel.cu changed shape; update tests/cuda_emulation/emulate.py"
        )
    return new


def kernel_source() -> str:
    s = (ROOT / "csrc" / "cuda" / "dsnt_kernel.cu").read_text()
    s = _rewrite(s, r"#include <c10/cuda/CUDAException\.h>\n", '#include "shim.h"\n', 1)
    s = _rewrite(s, r"#include <c10/cuda/CUDA(Guard|Stream)\.h>\n", "", 2)
    s = _rewrite(s, r"extern __shared__ __align__\(16\) unsigned char dsnt_smem\[\];",
                 "unsigned char* dsnt_smem = emu_smem_ptr;", 2)
    s = _rewrite(s, r"\n\s*TORCH_CHECK\(logits\.is_cuda\(\)[^;]*;", "", 2)
    s = _rewrite(s, r"\n\s*const c10::cuda::CUDAGuard guard\([^;]*;", "", 2)
    s = _rewrite(s, r"\n\s*cudaStream_t stream = [^;]*;", "", 2)
    s = _rewrite(s, r"\n\s*C10_CUDA_KERNEL_LAUNCH_CHECK\(\);", "", 2)
    s = _rewrite(s, r"at::empty\((\{[^}]*\}|logits\.sizes\(\)),", r"at::full(\1, NAN,", 5)
    s = _rewrite(s, r"(dsnt_(?:fwd|bwd)_kernel<[^;]*?>)<<<grid, l\.threads, l\.smem, stream>>>\(a\);",
                 r"emu_launch(grid.x, l.threads, l.smem, [&] { \1(a); });", 6)
    s = _rewrite(s, r"TORCH_LIBRARY_IMPL\(dsnt_cuda, CUDA, m\) \{.*?\n\}\n", "", 1, flags=re.S)
    return s + BINDINGS


def ops_source() -> str:
    s = (ROOT / "csrc" / "dsnt_ops.cpp").read_text()
    return _rewrite(s, r"TORCH_LIBRARY\(dsnt_cuda, m\) \{.*?\n\}\n", "", 1, flags=re.S)


def load(build_dir: Path):
    """Generate the sources under build_dir and build (or reuse) the emulated module."""
    from torch.utils.cpp_extension import load as load_extension

    # torch's load() needs ninja on PATH: the one installed next to this interpreter will do.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for name, text in (("emu_kernel.cpp", kernel_source()), ("emu_ops.cpp", ops_source())):
        path = build_dir / name
        if not path.exists() or path.read_text() != text:  # keep ninja's timestamps when unchanged
            path.write_text(text)
        sources.append(str(path))
    flags = ["-O1", "-std=c++20", "-Ddsnt_cuda=dsnt_emu", "-fno-fast-math",
             f"-I{ROOT / 'csrc'}", f"-I{HERE}"]
    return load_extension(name="dsnt_cuda_emulated", sources=sources, extra_cflags=flags,
                          build_directory=str(build_dir), verbose=False)
