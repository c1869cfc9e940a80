// The torch side of the CUDA ops' host code: which tensors they take, the device and stream they
// launch on, how outputs are allocated, the dispatch key they register under. Under
// DSNT_CUDA_EMULATION (tests/cuda_emulation/) the kernels run on the CPU: the ops take CPU
// tensors, register for the CPU key, and outputs start NaN so that an element no kernel wrote
// shows.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "launch.cuh"

#ifdef DSNT_CUDA_EMULATION
#define DSNT_CUDA_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define DSNT_CUDA_DISPATCH_KEY CUDA
#endif

namespace dsnt_cuda {

// Checks that `t` lives where the kernels run and, on a GPU, makes its device current for the
// scope. `what` names it in the error, e.g. "dsnt_fwd (CUDA): logits".
class DeviceScope {
 public:
  DeviceScope(const at::Tensor& t, const char* what) {
#ifdef DSNT_CUDA_EMULATION
    TORCH_CHECK(t.is_cpu(), what, " must be a CPU tensor (emulated CUDA kernels)");
#else
    TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor");
    guard_.emplace(t.device());
#endif
  }

 private:
#ifndef DSNT_CUDA_EMULATION
  std::optional<c10::cuda::CUDAGuard> guard_;
#endif
};

inline cudaStream_t current_stream() {
#ifdef DSNT_CUDA_EMULATION
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream();
#endif
}

// An output the kernels fill: uninitialized on a GPU, NaN in emulation.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef DSNT_CUDA_EMULATION
  t.fill_(NAN);
#endif
  return t;
}

}  // namespace dsnt_cuda
