// Host code shared by the CUDA ops' entry points (host_forward.cu, host_backward.cu): the launch
// plan of a call on its device, and the kernel arguments every launch shares.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>

#include "dsnt_ops.h"
#include "launchers.h"
#include "op_call.h"
#include "torch_launch.cuh"

#ifndef DSNT_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace dsnt_cuda {

// The CUDA backend of the op entries (op_call.h), registered in host.cu: forward in
// host_forward.cu, backward in host_backward.cu.
struct CudaHost {
  // The logits' device, checked and made current before anything else.
  struct Scope : DeviceScope {
    Scope(const at::Tensor& logits, bool backward)
        : DeviceScope(logits, backward ? "dsnt_bwd (CUDA): logits" : "dsnt_fwd (CUDA): logits") {}
  };
  static ForwardResult forward(const ForwardCall& call);
  static BackwardResult backward(const BackwardCall& call);
};

// Logits whose in-map element offsets fit 32 bits (the kernels' row offsets): the tensor
// itself, or (a map spanning 2^31 elements or more of memory, e.g. huge strides) a contiguous copy.
inline at::Tensor kernel_logits(const at::Tensor& logits) {
  int64_t extent = 0;
  for (int64_t d = 2; d < logits.dim(); ++d) extent += (logits.size(d) - 1) * logits.stride(d);
  return extent < (int64_t{1} << 31) ? logits : logits.contiguous();
}

inline const char* forced_class() { return std::getenv("DSNT_CUDA_FORCE_CLASS"); }

// The launcher of a plan's size class (the backward's split class runs the block kernel).
template <bool kBackward, bool kStandard, typename scalar_t, class F>
auto with_launcher(SizeClass c, F&& f) {
  switch (c) {
    case SizeClass::Warp:
      return f(Launcher<SizeClass::Warp, kBackward, kStandard, scalar_t>{});
    case SizeClass::Block:
      return f(Launcher<SizeClass::Block, kBackward, kStandard, scalar_t>{});
    case SizeClass::Cluster:
      if constexpr (kBackward)
        return f(Launcher<SizeClass::Block, true, kStandard, scalar_t>{});
      else
        return f(Launcher<SizeClass::Cluster, false, kStandard, scalar_t>{});
    default:
      if constexpr (kBackward)
        return f(Launcher<SizeClass::Block, true, kStandard, scalar_t>{});
      else
        return f(Launcher<SizeClass::Streamed, false, kStandard, scalar_t>{});
  }
}

// The standard-loss kernels assume a thread's x is the same in every chunk: rows that fit a tile
// (one segment), of a map with more than one row (streamed: any map, its x walk is per tile).
inline bool fixed_x(const LaunchPlan& p) {
  return p.layout.segs == 1 && (p.cls == SizeClass::Streamed || p.layout.rows > 1);
}

template <bool kBackward, bool kStandard, typename scalar_t>
LaunchPlan plan_with(const PlanInput& in, DeviceInfo dev) {
  dev.ctas_per_sm = [](SizeClass c, bool, int threads, size_t smem) {
    return with_launcher<kBackward, kStandard, scalar_t>(
        c, [&](auto l) { return l.ctas_per_sm(threads, smem); });
  };
  dev.max_active_clusters = [](int cluster, int threads, size_t smem) {
    return Launcher<SizeClass::Cluster, false, kStandard, scalar_t>::max_active_clusters(cluster, threads,
                                                                                         smem);
  };
  LaunchPlan p = plan_launch(in, dev);
  if (p.cls == SizeClass::Cluster && !kBackward &&
      dev.max_active_clusters(p.cluster, p.threads, p.smem) == 0) {
    dev.max_cluster = 8;  // no non-portable cluster sizes on this device: the portable limit
    p = plan_launch(in, dev);
  }
  return p;
}

// The plan of a call, and whether it runs the standard-loss kernel (`standard_modes`: the
// options allow it; the layout must too).
#ifndef DSNT_CUDA_EMULATION
// What the planner needs of a GPU, read once per device from the runtime (not through
// ATen/cuda/CUDAContext.h, which needs the cuSPARSE / cuBLAS headers an nvcc-only toolkit lacks).
struct DeviceAttributes {
  int sms = 0, major = 0, max_smem_per_cta = 0;
};

inline const DeviceAttributes& device_attributes(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceAttributes cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "dsnt_cuda: CUDA device index ", device, " out of range");
  std::call_once(once[device], [device] {
    DeviceAttributes& a = cache[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&a.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&a.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&a.max_smem_per_cta, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  });
  return cache[device];
}
#endif

template <bool kBackward, typename scalar_t>
LaunchPlan plan_for(const at::Tensor& logits, const MapGeometry& g, bool standard_modes, bool& standard) {
  PlanInput in;
  in.dims = g.dims;
  for (int k = 0; k < kMaxSpatialDims; ++k) {
    in.size[k] = g.size[k];
    in.stride[k] = k < g.dims ? logits.stride(logits.dim() - 1 - k) : 0;
  }
  in.maps = g.maps;
  in.elem_size = static_cast<int>(logits.element_size());
  in.backward = kBackward;
  in.force = forced_class();
  DeviceInfo dev;
#ifdef DSNT_CUDA_EMULATION
  dev.sms = 2;
#else
  const DeviceAttributes& attr = device_attributes(logits.device().index());
  dev.sms = attr.sms;
  dev.clusters = attr.major >= 9;
  dev.max_cluster = dev.clusters ? 16 : 1;
  dev.max_smem_per_cta = attr.max_smem_per_cta;
#endif
  if constexpr (kHasStandard<scalar_t>) {
    if (standard_modes) {
      const LaunchPlan p = plan_with<kBackward, true, scalar_t>(in, dev);
      standard = fixed_x(p);
      if (standard) return p;
    }
  }
  standard = false;
  return plan_with<kBackward, false, scalar_t>(in, dev);
}

template <bool kBackward, typename scalar_t>
void launch_planned(const ArgsOf<kBackward, scalar_t>& a, const LaunchPlan& p, bool standard) {
  const cudaStream_t stream = current_stream();
  if constexpr (kHasStandard<scalar_t>) {
    if (standard) {
      with_launcher<kBackward, true, scalar_t>(p.cls, [&](auto l) { l.launch(a, p, stream); });
      return;
    }
  }
  with_launcher<kBackward, false, scalar_t>(p.cls, [&](auto l) { l.launch(a, p, stream); });
}

template <typename scalar_t>
void fill_map_args(MapArgs<scalar_t>& a, const at::Tensor& logits, const MapGeometry& g, const OpOptions& o,
                   const LaunchPlan& p, const at::Tensor& target, const at::Tensor& mask,
                   const at::Tensor& beta, const at::Tensor& sigma) {
  using T = acc_t<scalar_t>;
  TORCH_CHECK_VALUE(g.maps < (int64_t{1} << 31), "dsnt_cuda: at most 2^31 - 1 maps (B * L), got ", g.maps);
  a.logits = logits.const_data_ptr<scalar_t>();
  a.stride_b = logits.stride(0);
  a.stride_l = logits.stride(1);
  a.layout = p.layout;
  a.maps = static_cast<int>(g.maps);
  a.keypoints = FastDivmod(static_cast<uint32_t>(g.keypoints));
  a.modes.norm_ = o.normalization;
  a.modes.reg_ = o.reg;
  a.coord_loss = o.coord_loss;
  a.normalized = o.normalized;
  a.reg_weight = static_cast<T>(o.reg_weight);
  a.beta = per_map_scalar<T>(beta, o.beta);
  a.sigma_t = per_map_scalar<T>(sigma, o.sigma_t);
  a.target = target.defined() ? target.const_data_ptr<T>() : nullptr;
  a.mask = mask.defined() ? mask.const_data_ptr<T>() : nullptr;
  a.smem = p.carve;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace dsnt_cuda
