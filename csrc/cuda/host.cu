// Registration of the CUDA ops (the entry points: host_forward.cu, host_backward.cu).
#include <torch/library.h>

#include "host_common.cuh"

TORCH_LIBRARY_IMPL(dsnt_cuda, DSNT_CUDA_DISPATCH_KEY, m) {
  m.impl("dsnt_fwd", &dsnt_cuda::dsnt_fwd_entry<dsnt_cuda::CudaHost>);
  m.impl("dsnt_bwd", &dsnt_cuda::dsnt_bwd_entry<dsnt_cuda::CudaHost>);
}
