// Size classes and grids (docs/performance.md §5). Host-only.
//
//   forward:  warp (map <= 32 threads x 32 elements) -> block (<= 256 x 32) -> cluster (sm_90,
//             the map split over up to max_cluster CTAs of 512 threads) -> streamed;
//   backward: warp -> block -> split (a map over several CTAs; one pass in every case).
// Grids are persistent and balanced: with R work items resident at once, `waves` =
// ceil(items / R) rounds and the grid is ceil(items / waves) items, so the last round is as
// full as the item count allows (wholebody, face: under 1 % idle) instead of a partial wave.
// Also the report's entry (dsnt_cuda_launch_plan_json, at the end): the plans it prints come from
// this planner, fed with a device model instead of a live GPU.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>

#include "kernel_args.cuh"
#include "launch_plan.h"

namespace dsnt_cuda {

namespace {

constexpr int kWarpCtaThreads = 256;  // the warp class: 8 maps per CTA
constexpr int kBlockMaxThreads = 128;
constexpr int kClusterThreads = 256;
constexpr int kStreamedThreads = 512;
constexpr int kSplitThreads = 256;
// A launch that moves less than this per pass is bound by launch latency, not bandwidth.
constexpr double kLaunchBoundBytes = 4.0 * 1024 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

TileLayout make_layout(const PlanInput& in, int group, int chunks) {
  TileLayout L;
  L.dims = in.dims;
  for (int k = 0; k < kMaxSpatialDims; ++k) L.size[k] = static_cast<int>(in.size[k]);
  L.map_size = L.size[0] * L.size[1] * L.size[2];
  L.rows = L.size[1] * L.size[2];
  L.vec = 16 / in.elem_size;
  L.chunks = chunks;
  L.group = group;
  const int row_chunks = static_cast<int>(ceil_div(L.size[0], L.vec));
  L.cols = std::min(row_chunks, group);
  L.row_width = L.cols * L.vec;
  L.segs = static_cast<int>(ceil_div(L.size[0], L.row_width));
  L.vrows = L.rows * L.segs;
  L.tile_rows = group / L.cols;
  L.slice_vrows = L.tile_rows * chunks;
  L.stride_x = in.stride[0];
  L.stride_y = in.stride[1];
  L.stride_z = in.stride[2];
  L.segs_div = FastDivmod(static_cast<uint32_t>(L.segs));
  L.size_y_div = FastDivmod(static_cast<uint32_t>(L.size[1]));
  const bool padded =
      L.tile_rows * L.cols != group || L.vrows % L.slice_vrows != 0 || L.size[0] % L.row_width != 0;
  L.whole_out_chunks = !padded;
  L.whole_chunks = !padded && in.stride[0] == 1 && (in.stride[1] * in.elem_size) % 16 == 0 &&
                   (in.stride[2] * in.elem_size) % 16 == 0;
  return L;
}

int slices_of(const TileLayout& L) { return static_cast<int>(ceil_div(L.vrows, L.slice_vrows)); }

SmemPlan carve_of(const TileLayout& L, SizeClass c, bool backward, int threads, int elem_size) {
  const bool warp = c == SizeClass::Warp;
  const int warps = threads / 32;
  const size_t acc = elem_size == 8 ? 8 : 4;
  if (c == SizeClass::Streamed) {  // the reduction scratch only
    SmemPlan p;
    p.total = align16(acc * kRounds * warps * kMaxReduce);
    return p;
  }
  return smem_plan(L, warp ? warps : 1, warp ? 1 : warps, backward, c == SizeClass::Cluster && !backward, acc,
                   L.chunks);
}

size_t smem_of(const TileLayout& L, SizeClass c, bool backward, int threads, int elem_size) {
  return carve_of(L, c, backward, threads, elem_size).total;
}

// Fills the grid of `p` (class, layout, threads, slices set) for `items` work items.
void size_grid(LaunchPlan& p, const PlanInput& in, const DeviceInfo& dev) {
  p.carve = carve_of(p.layout, p.cls, in.backward, p.threads, in.elem_size);
  p.smem = p.carve.total;
  p.ctas_per_sm = std::max(1, dev.ctas_per_sm(p.cls, in.backward, p.threads, p.smem));
  p.resident = static_cast<int64_t>(p.ctas_per_sm) * dev.sms;
  // a work unit is what the grid distributes: groups of CTAs (clusters, split maps) or maps
  int64_t unit_ctas = p.slices, per_cta = p.groups_per_cta;
  int64_t units_resident = std::max<int64_t>(1, p.resident / unit_ctas) * per_cta;
  if (p.cls == SizeClass::Cluster && !in.backward && dev.max_active_clusters) {
    units_resident = std::max(1, dev.max_active_clusters(p.cluster, p.threads, p.smem));
  }
  const int64_t items = std::max<int64_t>(in.maps, 1);
  p.waves = ceil_div(items, units_resident);
  const int64_t units = ceil_div(items, p.waves);
  p.ctas = ceil_div(units, per_cta) * unit_ctas;
  const int64_t last = items - (p.waves - 1) * units;
  p.last_wave_idle = 1.0 - static_cast<double>(last) / static_cast<double>(units);
  p.hbm_reads = p.cls == SizeClass::Streamed ? 2 : 1;
  p.hbm_writes = in.backward ? 1 : 0;
  const double bytes = static_cast<double>(in.maps) * static_cast<double>(p.layout.map_size) * in.elem_size;
  p.launch_bound = bytes < kLaunchBoundBytes;
}

bool fits(const TileLayout& L, const DeviceInfo& dev, SizeClass c, bool backward, int threads,
          int elem_size) {
  return smem_of(L, c, backward, threads, elem_size) <= static_cast<size_t>(dev.max_smem_per_cta);
}

// The smallest group (multiple of 32 threads, <= max_threads) whose tile holds the map.
bool smallest_group(const PlanInput& in, int chunks, int max_threads, TileLayout& out) {
  for (int g = 32; g <= max_threads; g += 32) {
    TileLayout L = make_layout(in, g, chunks);
    if (slices_of(L) == 1) {
      out = L;
      return true;
    }
  }
  return false;
}

bool plan_cluster(const PlanInput& in, const DeviceInfo& dev, int chunks, bool forced, LaunchPlan& p) {
  if (!dev.clusters) return false;
  // forced (tests): the fewest threads that split the map over at most max_cluster CTAs
  for (int g = forced ? 32 : kClusterThreads; g <= kClusterThreads; g += 32) {
    TileLayout L = make_layout(in, g, chunks);
    const int ranks = slices_of(L);
    if (ranks > dev.max_cluster || (forced && ranks < 2 && g < kClusterThreads)) continue;
    if (!fits(L, dev, SizeClass::Cluster, false, g, in.elem_size)) return false;
    p.cls = SizeClass::Cluster;
    p.layout = L;
    p.threads = g;
    p.cluster = p.slices = ranks;
    return true;
  }
  return false;
}

}  // namespace

const char* size_class_name(SizeClass c, bool backward) {
  switch (c) {
    case SizeClass::Warp:
      return "warp";
    case SizeClass::Block:
      return "block";
    case SizeClass::Cluster:
      return backward ? "split" : "cluster";
    default:
      return backward ? "split" : "streamed";
  }
}

int model_ctas_per_sm(int registers, int threads, size_t smem) {
  const int warps = (threads + 31) / 32;
  const int regs_per_warp = (registers * 32 + 255) / 256 * 256;
  const int by_regs = 65536 / std::max(1, warps * regs_per_warp);
  const int by_threads = 2048 / (warps * 32);
  const int by_smem = static_cast<int>((228 * 1024) / (smem + 1024));
  return std::max(0, std::min({by_regs, by_threads, by_smem, 32}));
}

LaunchPlan plan_launch(const PlanInput& in, const DeviceInfo& dev) {
  auto chunks_of = [&](TileKind kind) {
    return tile_chunks(in.elem_size, in.backward ? TileKind::Backward : kind);
  };
  const std::string force = in.force != nullptr ? in.force : "";
  TORCH_CHECK_VALUE(
      force.empty() || force == "warp" || force == "block" || force == "cluster" || force == "streamed",
      "dsnt_cuda: DSNT_CUDA_FORCE_CLASS must be warp, block, cluster or streamed, got '", force, "'");
  LaunchPlan p;
  const bool any = force.empty();
  TileLayout L;
  const TileLayout warp = make_layout(in, 32, chunks_of(TileKind::Warp));
  if ((any || force == "warp") && slices_of(warp) == 1 &&
      fits(warp, dev, SizeClass::Warp, in.backward, kWarpCtaThreads, in.elem_size)) {
    p.cls = SizeClass::Warp;
    p.layout = warp;
    p.threads = kWarpCtaThreads;
    p.groups_per_cta = kWarpCtaThreads / 32;
  } else if ((any || force == "block") &&
             smallest_group(in, chunks_of(TileKind::Block), in.backward ? kSplitThreads : kBlockMaxThreads,
                            L) &&
             fits(L, dev, SizeClass::Block, in.backward, L.group, in.elem_size)) {
    p.cls = SizeClass::Block;
    p.layout = L;
    p.threads = L.group;
  } else if (in.backward) {
    // split: a map over several CTAs, each the same slice of its maps (forced: small CTAs)
    const int g = force.empty() ? kSplitThreads : 32;
    p.cls = SizeClass::Cluster;
    p.layout = make_layout(in, g, chunks_of(TileKind::Backward));
    p.threads = g;
    p.slices = slices_of(p.layout);
    TORCH_CHECK(fits(p.layout, dev, p.cls, true, g, in.elem_size),
                "dsnt_cuda: the rows of this map need more ", "shared memory than a CTA has (",
                p.layout.size[0], " x ", p.layout.rows, " elements)");
  } else if (!((any || force == "cluster") &&
               plan_cluster(in, dev, chunks_of(TileKind::Cluster), force == "cluster", p))) {
    TORCH_CHECK(any || force == "streamed", "dsnt_cuda: size class '", force, "' cannot hold maps of ",
                in.size[0] * in.size[1] * in.size[2], " elements");
    p.cls = SizeClass::Streamed;
    p.layout = make_layout(in, kStreamedThreads, chunks_of(TileKind::Streamed));
    p.threads = kStreamedThreads;
  }
  size_grid(p, in, dev);
  return p;
}

namespace {

// registers[]: the kernels' registers, in KernelRegisters order (0: unknown, 64 assumed).
// The forward kernels in SizeClass order, then the backward warp and block (split) kernels.
enum KernelRegisters { kFwdWarp, kFwdBlock, kFwdCluster, kFwdStreamed, kBwdWarp, kBwdBlock };
static_assert(kFwdStreamed == static_cast<int>(SizeClass::Streamed), "forward kernels in SizeClass order");

DeviceInfo modelled_device(const int* registers, int sms, int max_cluster) {
  auto regs = [registers](SizeClass c, bool backward) {
    const int i = backward ? (c == SizeClass::Warp ? kBwdWarp : kBwdBlock) : static_cast<int>(c);
    return registers[i] > 0 ? registers[i] : 64;
  };
  DeviceInfo dev;
  dev.sms = sms;
  dev.max_cluster = max_cluster;
  dev.ctas_per_sm = [regs](SizeClass c, bool backward, int threads, size_t smem) {
    return model_ctas_per_sm(regs(c, backward), threads, smem);
  };
  // the GPU's resident CTAs grouped into clusters (on a GPU the occupancy API says it)
  dev.max_active_clusters = [regs, sms](int cluster, int threads, size_t smem) {
    return sms * model_ctas_per_sm(regs(SizeClass::Cluster, false), threads, smem) / cluster;
  };
  return dev;
}

std::string plan_json(const LaunchPlan& p, bool backward) {
  std::ostringstream o;
  o << "{\"class\": \"" << size_class_name(p.cls, backward) << "\", \"threads\": " << p.threads
    << ", \"maps_per_cta\": " << p.groups_per_cta << ", \"ctas_per_map\": " << p.slices
    << ", \"cluster\": " << p.cluster << ", \"ctas\": " << p.ctas << ", \"ctas_per_sm\": " << p.ctas_per_sm
    << ", \"resident_ctas\": " << p.resident << ", \"waves\": " << p.waves
    << ", \"last_wave_idle\": " << p.last_wave_idle << ", \"hbm_reads\": " << p.hbm_reads
    << ", \"hbm_writes\": " << p.hbm_writes << ", \"smem\": " << p.smem
    << ", \"launch_bound\": " << (p.launch_bound ? "true" : "false") << ", \"group\": " << p.layout.group
    << ", \"cols\": " << p.layout.cols << ", \"tile_rows\": " << p.layout.tile_rows
    << ", \"vrows\": " << p.layout.vrows << ", \"slice_vrows\": " << p.layout.slice_vrows
    << ", \"elements_per_thread\": " << p.layout.chunks * p.layout.vec << "}";
  return o.str();
}

}  // namespace

}  // namespace dsnt_cuda

// The launch plan of contiguous logits of shape (batch, keypoints, *spatial) as JSON, for the
// report (scripts/sass_count.py loads it with ctypes from the built extension or from the
// emulation's build of these sources: no GPU, no CUDA runtime). The string lives until the
// calling thread's next call; an error is returned as {"error": ...}.
extern "C" __attribute__((visibility("default"))) const char* dsnt_cuda_launch_plan_json(
    int64_t batch, int64_t keypoints, int dims, const int64_t* spatial, int elem_size, int backward,
    const int* registers, int sms, int max_cluster) {
  using namespace dsnt_cuda;
  thread_local std::string out;
  try {
    PlanInput in;
    TORCH_CHECK_VALUE(dims >= 1 && dims <= kMaxSpatialDims, "1 to 3 spatial sizes");
    in.dims = dims;
    int64_t stride = 1;
    for (int k = 0; k < dims; ++k) {  // x is the last tensor dim
      in.size[k] = spatial[dims - 1 - k];
      in.stride[k] = stride;
      stride *= in.size[k];
    }
    in.maps = batch * keypoints;
    in.elem_size = elem_size;
    in.backward = backward != 0;
    out = plan_json(plan_launch(in, modelled_device(registers, sms, max_cluster)), in.backward);
  } catch (const std::exception& e) {
    std::string message = e.what();
    for (char& c : message) c = (c == '"' || c == '\\' || c == '\n') ? ' ' : c;  // a JSON string
    out = "{\"error\": \"" + message + "\"}";
  }
  return out.c_str();
}
