// The Python module `dsnt_cuda._C`: importing it registers the ops (TORCH_LIBRARY blocks in the
// other translation units) and exposes what the build contains. Ops go through the dispatcher,
// never through pybind11.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "dsnt_ops.h"

namespace dsnt_cuda {
#ifdef DSNT_WITH_CUDA
// Defined in csrc/cuda/build_info.cu, where nvcc's macros are visible.
std::string cuda_runtime_version();
std::string cuda_architectures();
#endif
}  // namespace dsnt_cuda

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(TORCH_VERSION);
#ifdef DSNT_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = dsnt_cuda::cuda_runtime_version();
  info["cuda_architectures"] = dsnt_cuda::cuda_architectures();
#else
  info["with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_architectures"] = std::string();
#endif
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsnt_cuda's compiled kernels; the ops live in torch.ops.dsnt_cuda";
  m.def("build_info", &build_info, "torch version, CUDA version and GPU architectures of this build");
  m.def(
      "register_autograd", &dsnt_cuda::register_autograd, pybind11::arg("forward_op"),
      pybind11::arg("backward_op"),
      "the fused ops' autograd (csrc/dsnt_autograd.cpp) for an op pair with dsnt_fwd's / dsnt_bwd's schemas");
}
