// The CPU kernels of one instruction-set build: the per-chunk drivers the host code calls (widen
// float16 / bfloat16 maps to float, gather a map's inputs, run forward_map / backward_map,
// narrow the gradient back), and their table.
//
// Included by exactly one translation unit per instruction set (dsnt_cpu_kernels.cpp: portable;
// dsnt_cpu_kernels_avx2.cpp: AVX2 + FMA), after it has chosen the at::vec capability and
// defined DSNT_CPU_NS, the namespace that keeps each build's symbols apart. Accumulation type
// T: double for float64 logits, float otherwise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu/backward_map.h"
#include "cpu/kernel_args.h"

#ifndef DSNT_CPU_NS
#error "define DSNT_CPU_NS before including kernels.h"
#endif

namespace dsnt_cuda::cpu::DSNT_CPU_NS {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Of a (float, double) pair of MapArgs members, the one of the accumulation type T.
template <typename T, typename F, typename D>
const auto& of_acc_type(const F& as_float, const D& as_double) {
  if constexpr (std::is_same_v<T, double>) {
    return as_double;
  } else {
    return as_float;
  }
}

template <typename T>
MapInputs<T> map_inputs(const MapArgs& a, int64_t m) {
  const int64_t b = m / a.geometry.keypoints, l = m % a.geometry.keypoints;
  MapInputs<T> in;
  in.beta = of_acc_type<T>(a.beta_f, a.beta_d).at(b, l);
  in.sigma_t = of_acc_type<T>(a.sigma_t_f, a.sigma_t_d).at(b, l);
  in.mu = a.target != nullptr ? static_cast<const T*>(a.target) + m * a.geometry.dims : nullptr;
  return in;
}

// Map m's logits as T: the logits themselves (float, double) or a widened copy in ws.logits.
template <typename scalar_t, typename T>
const T* map_logits(const MapArgs& a, int64_t m, Workspace<T>& ws) {
  const int64_t n = ws.axes.map_size;
  const scalar_t* src = static_cast<const scalar_t*>(a.logits) + m * n;
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    T* dst = ws.logits.data();
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
    return dst;
  }
}

template <typename scalar_t>
void forward_chunk(const ForwardArgs& a, int64_t begin, int64_t end) {
  using T = acc_t<scalar_t>;
  const MapArgs& ma = a.map;
  Workspace<T> ws(ma.geometry, !std::is_same_v<scalar_t, T>, true);
  const int dims = ma.geometry.dims;
  for (int64_t m = begin; m < end; ++m) {
    const MapOutputs<T> out{
        static_cast<T*>(a.coords) + m * dims,
        static_cast<T*>(a.variance) + m * dims,
        static_cast<T*>(a.reg_losses) + m,
        a.coord_losses != nullptr ? static_cast<T*>(a.coord_losses) + m : nullptr,
        static_cast<T*>(a.stats) + m * stats_size(dims),
    };
    forward_map(map_logits<scalar_t>(ma, m, ws), map_inputs<T>(ma, m), ma.options, ws, out);
  }
}

template <typename T>
const T* entry(const void* base, int64_t index) {
  return base != nullptr ? static_cast<const T*>(base) + index : nullptr;
}

template <typename scalar_t>
void backward_chunk(const BackwardArgs& a, int64_t begin, int64_t end) {
  using T = acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, T>;
  const MapArgs& ma = a.map;
  const OpOptions& o = ma.options;
  Workspace<T> ws(ma.geometry, kWiden, false);
  const int dims = ma.geometry.dims;
  const int64_t n = ws.axes.map_size;
  auto* grad_logits = static_cast<scalar_t*>(a.grad_logits);
  for (int64_t m = begin; m < end; ++m) {
    const MapInputs<T> in = map_inputs<T>(ma, m);
    const T* mask = entry<T>(a.mask, m);
    const T* grad_reg = entry<T>(a.grad_reg_losses, m);
    const T* grad_cl = entry<T>(a.grad_coord_losses, m);
    MapGrads<T> g;
    g.upstream = MapUpstreamInputs<T>{
        entry<T>(a.grad_coords, m * dims),
        entry<T>(a.grad_variance, m * dims),
        grad_reg != nullptr ? *grad_reg : T(0),
        grad_cl != nullptr ? *grad_cl : T(0),
        static_cast<T>(a.loss_scale) * (mask != nullptr ? *mask : T(1)),
        entry<T>(a.coords, m * dims),
        entry<T>(a.variance, m * dims),
        in.mu,
        in.sigma_t,
        static_cast<T>(o.reg_weight),
        o.reg,
        o.coord_loss,
    };
    g.stats = entry<T>(a.stats, m * stats_size(dims));
    g.grad_logits = kWiden ? ws.grad.data() : reinterpret_cast<T*>(grad_logits + m * n);
    g.grad_target = static_cast<T*>(a.grad_target) + m * dims;
    g.grad_beta = a.grad_beta != nullptr ? static_cast<T*>(a.grad_beta) + m : nullptr;
    backward_map(map_logits<scalar_t>(ma, m, ws), in, o, a.reg_path, a.needs_target_grad, ws, g);
    if constexpr (kWiden) {
      scalar_t* dst = grad_logits + m * n;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(ws.grad[i]);
    }
  }
}

inline KernelTable make_table() {
  KernelTable t{};
  t.forward[static_cast<int>(DType::kF32)] = &forward_chunk<float>;
  t.forward[static_cast<int>(DType::kF64)] = &forward_chunk<double>;
  t.forward[static_cast<int>(DType::kF16)] = &forward_chunk<c10::Half>;
  t.forward[static_cast<int>(DType::kBF16)] = &forward_chunk<c10::BFloat16>;
  t.backward[static_cast<int>(DType::kF32)] = &backward_chunk<float>;
  t.backward[static_cast<int>(DType::kF64)] = &backward_chunk<double>;
  t.backward[static_cast<int>(DType::kF16)] = &backward_chunk<c10::Half>;
  t.backward[static_cast<int>(DType::kBF16)] = &backward_chunk<c10::BFloat16>;
  return t;
}

}  // namespace dsnt_cuda::cpu::DSNT_CPU_NS
