"""Build of the dsnt_cuda C++/CUDA extension (`dsnt_cuda._C`).

The CUDA sources are compiled whenever a CUDA toolkit (nvcc) is found, GPU or not, so CI builds
and imports the real CUDA kernels on GPU-less machines. Set DSNT_CUDA_NO_CUDA=1 for a CPU-only
build (quicker while iterating on the CPU kernels).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The real toolkit root (holding bin/nvcc, include/, lib64/), or None.

    nvcc on PATH may be a wrapper script outside the toolkit, where torch's own guess fails with
    `cannot find -lcudart`; so look for a directory that really has the headers.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and (
            os.path.exists(os.path.join(root, "bin", "nvcc"))
        ):
            return root
    return None


def torch_has_cuda():
    """A CPU-only torch (e.g. 2.13.0+cpu) has no CUDA headers/libraries to build against."""
    import torch  # does not import torch.utils.cpp_extension, which reads CUDA_HOME on import

    return torch.version.cuda is not None


WITH_CUDA = (
    os.environ.get("DSNT_CUDA_NO_CUDA", "0") != "1" and find_cuda_home() is not None and torch_has_cuda()
)
if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = find_cuda_home()
    # Without an explicit list torch probes for GPUs and fails on machines that have none.
    # The lent GPUs are sm_90 (H100/H200); CUDA 13 supports 7.5 and newer only.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


# -fopenmp: at::parallel_for is an inline template over OpenMP pragmas; compiled without it the
# CPU kernels silently run on one thread. The runtime (libgomp.so.1) is the one torch loads.
cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
link_flags = ["-fopenmp"]
cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
if WITH_CUDA:
    extension = CUDAExtension(
        "dsnt_cuda._C",
        cpp_sources + sources("csrc/cuda/*.cu") + sources("csrc/cuda/instances/*.cu"),
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("DSNT_WITH_CUDA", "1")],
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
else:
    extension = CppExtension(
        "dsnt_cuda._C",
        cpp_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags},
    )

setup(
    name="dsnt_cuda",
    packages=find_packages(include=["dsnt_cuda", "dsnt_cuda.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
