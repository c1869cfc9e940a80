// What the CUDA part of this build was compiled with, for dsnt_cuda.build_info().
#include <cuda_runtime_api.h>

#include <string>

namespace dsnt_cuda {

std::string cuda_runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 900 or 800,900) in host code since CUDA 11.5.
#define DSNT_STRINGIFY_(x) #x
#define DSNT_STRINGIFY(x) DSNT_STRINGIFY_(x)
std::string cuda_architectures() {
#ifdef __CUDA_ARCH_LIST__
  return DSNT_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace dsnt_cuda
