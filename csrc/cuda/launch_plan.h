// The launch plan of a forward or backward call: size class, tile layout, threads, CTAs,
// cluster size, shared memory, and the occupancy figures the report prints. Host-only; the
// launchers (host.cu) and the report (dsnt_cuda._C.cuda_launch_plan, make cuda-report) call the
// same functions, so the printed plan is the launched one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "kernel_args.cuh"

namespace dsnt_cuda {

enum class SizeClass : int { Warp = 0, Block = 1, Cluster = 2, Streamed = 3 };
const char* size_class_name(SizeClass c, bool backward);

// What the plan needs to know about the device and the kernels.
struct DeviceInfo {
  int sms = 132;
  int max_cluster = 8;   // 16 where the device allows non-portable cluster sizes
  bool clusters = true;  // sm_90 and newer
  int max_smem_per_cta = 227 * 1024;
  // CTAs of a kernel resident per SM for a launch shape, and clusters resident on the GPU.
  std::function<int(SizeClass, bool backward, int threads, size_t smem)> ctas_per_sm;
  std::function<int(int cluster, int threads, size_t smem)> max_active_clusters;
};

// The same resource model ptxas figures feed (H100 / H200 limits): registers (allocated per
// warp in units of 256), threads, shared memory (+1 KiB reserved per CTA), 32 CTAs.
int model_ctas_per_sm(int registers, int threads, size_t smem);

struct LaunchPlan {
  SizeClass cls = SizeClass::Block;
  TileLayout layout;
  int threads = 0;         // per CTA
  int groups_per_cta = 1;  // maps a CTA works on at once (warp class: 8)
  int cluster = 1;         // CTAs per cluster (cluster class)
  int slices = 1;          // CTAs per map (cluster class and split backward)
  int64_t ctas = 0;        // grid size
  size_t smem = 0;         // dynamic shared memory per CTA
  SmemPlan carve;          // where its arrays live
  int ctas_per_sm = 0;
  int64_t resident = 0;  // CTAs resident at once on the whole GPU
  int64_t waves = 0;     // rounds of work items over the resident CTAs
  double last_wave_idle = 0.0;
  int hbm_reads = 1, hbm_writes = 0;  // passes over the logits / gradient
  bool launch_bound = false;          // too little work to fill the GPU
};

struct PlanInput {
  int dims = 2;
  int64_t size[3] = {1, 1, 1};  // x, y, z
  int64_t stride[3] = {1, 1, 1};
  int64_t maps = 0;
  int elem_size = 4;  // bytes per logit
  bool backward = false;
  const char* force = nullptr;  // DSNT_CUDA_FORCE_CLASS: warp, block, cluster, streamed
};

LaunchPlan plan_launch(const PlanInput& in, const DeviceInfo& dev);

}  // namespace dsnt_cuda
