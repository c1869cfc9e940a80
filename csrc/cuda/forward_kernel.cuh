// The forward kernel of the on-chip size classes (docs/performance.md §3, §5):
//
//   warp class     a warp per map, 8 maps per CTA, the map in registers;
//   block class    a CTA per map (G threads, G * 32 elements at most), the map in registers;
//   cluster class  a map split over the CTAs of a thread-block cluster (sm_90), each CTA's slice
//                  in its shared memory, the three reductions through distributed shared memory.
//
// Each reads the logits once. Why a cluster and not partial sums in a global workspace: the
// forward needs three dependent reductions over the map (max, then the sum and mean, then the
// centred moments with the divergence), each needing the previous one's result in every CTA.
// Through global memory that is three grid-wide synchronizations (separate launches, or a
// cooperative grid with spin-waits on flags through L2), and the slices would have to leave the
// chip between them or be re-read from HBM. A cluster's CTAs are co-scheduled by the hardware,
// synchronize with barrier.cluster and read each other's totals over the SM-to-SM network, so
// the slices stay in shared memory from the load to the last pass.
//
// Grids are persistent (host.cu sizes them to the resident CTAs, balanced over the maps); each
// group walks the maps grid-stride.
#pragma once

#include "forward_map.cuh"

namespace dsnt_cuda {

enum class FwdClass : int { Warp = 0, Block = 1, Cluster = 2 };

// The tables of one group, in smem_plan's order: x tables, y, z, row tables.
template <typename T>
DSNT_DEV TargetTables<T> carve_forward_tables(unsigned char* block, const SmemPlan& sp) {
  auto at = [&](int i) { return reinterpret_cast<T*>(block + sp.table[i]); };
  return {at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)};
}

// The records of this CTA's slice (virtual rows [v_first, v_first + slice_vrows)) and one
// padding record after them.
template <typename T>
DSNT_DEV void build_records(const TileLayout& L, int v_first, int x_origin, RowCoords<T>* rc, RowMemory* rm) {
  for (int v = threadIdx.x; v <= L.slice_vrows; v += blockDim.x) {
    row_record(L, v < L.slice_vrows ? v_first + v : L.vrows, x_origin, rc[v], rm[v]);
  }
}

// Where a group of threads (a warp of the warp class, else the CTA) works, forward and backward:
// the row records of the CTA's slice (virtual rows from v_first), built here by the whole CTA,
// and the group's own block of shared memory (its tables and reduction scratch).
template <typename T>
struct GroupPlace {
  GroupMemory<T> gm;  // own_x / own_yz are the caller's
  int group;          // the group's index in the CTA (its warp in the warp class, else 0)
  int t;              // the thread's index in its group
  unsigned char* block;
  T* scratch;
};

template <bool kWarp, typename T>
DSNT_DEV GroupPlace<T> place_group(const TileLayout& L, const SmemPlan& sp, unsigned char* smem,
                                   int v_first) {
  GroupPlace<T> p;
  p.gm.x_entries = sp.x_entries;
  p.gm.x_origin = L.rows == 1 ? v_first * L.row_width : 0;
  RowCoords<T>* rc = reinterpret_cast<RowCoords<T>*>(smem + sp.coords);
  RowMemory* rm = reinterpret_cast<RowMemory*>(smem + sp.memory);
  p.gm.coords = rc;
  p.gm.memory = rm;
  build_records(L, v_first, p.gm.x_origin, rc, rm);
  p.group = kWarp ? static_cast<int>(threadIdx.x / 32) : 0;
  p.t = kWarp ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
  p.block = smem + sp.groups + p.group * sp.group_bytes;
  p.scratch = reinterpret_cast<T*>(p.block + sp.scratch);
  return p;
}

// Launch bounds: the warp class runs 256 threads (8 maps) a CTA and 2 CTAs an SM (128 registers:
// at 3 CTAs, 80 registers, its 32 elements and per-map values did not fit and the compiler
// recomputed the group's addresses in every map); the block class at most 128 threads (64
// elements each) and 4 CTAs (128 registers); the cluster class 256 threads and 2 CTAs (its tile
// is in shared memory).
template <FwdClass kClass>
constexpr int kFwdThreads = kClass == FwdClass::Block ? 128 : 256;
template <FwdClass kClass>
constexpr int kFwdMinBlocks = kClass == FwdClass::Warp ? 2 : (kClass == FwdClass::Block ? 4 : 2);

// kStandard: the standard-loss kernel (kernel_args.cuh, StandardModes).
template <typename scalar_t, FwdClass kClass, bool kStandard>
__global__ void __launch_bounds__(kFwdThreads<kClass>, kFwdMinBlocks<kClass>)
    dsnt_fwd_kernel(const FwdArgs<scalar_t> a) {
  using T = acc_t<scalar_t>;
  constexpr int V = kChunkElems<scalar_t>;
  constexpr bool kWarp = kClass == FwdClass::Warp, kCluster = kClass == FwdClass::Cluster;
  constexpr int C = kChunksPerThread < scalar_t,
                kWarp ? TileKind::Warp : (kCluster ? TileKind::Cluster : TileKind::Block) > ;
  const TileLayout& L = a.layout;
  const int warps = static_cast<int>(blockDim.x / 32);
  const SmemPlan& sp = a.smem;
  unsigned char* smem = dynamic_smem<unsigned char>();

  unsigned rank = 0, ranks = 1;
  if constexpr (kCluster) {
    rank = cluster_block_rank();
    ranks = cluster_num_blocks();
  }
  const int v_first = static_cast<int>(rank) * L.slice_vrows;
  GroupPlace<T> place = place_group<kWarp, T>(L, sp, smem, v_first);
  GroupMemory<T>& gm = place.gm;
  gm.own_x = rank == 0 || L.rows == 1;  // a slice of one row sums its own x range; else rank 0 all axes
  gm.own_yz = rank == 0;
  const int t = place.t;
  T* scratch = place.scratch;
  gm.tab = carve_forward_tables<T>(place.block, sp);
  const TilePlace<T> tp = tile_place<T>(L, t);
  DSNT_SYNCTHREADS(records_built);

  int first, stride;
  if constexpr (kWarp) {
    first = static_cast<int>(blockIdx.x) * warps + place.group;
    stride = static_cast<int>(gridDim.x) * warps;
  } else {
    first = static_cast<int>(blockIdx.x / ranks);
    stride = static_cast<int>(gridDim.x / ranks);
  }
  const OutputArgs<T> out = output_args(a);  // its per-axis divisions once, not per map
  if constexpr (kWarp) {
    const WarpGroup<T> g{t, scratch};
    RegisterTile<T, C, V> tile;
    for (int m = first; m < a.maps; m += stride)
      forward_map<scalar_t, C, kStandard>(a, m, g, tile, tp, gm, out);
  } else if constexpr (kCluster) {
    ClusterGroup<T> g;
    g.t = t;
    g.warps = warps;
    g.scratch = scratch;
    g.slots = reinterpret_cast<T*>(smem + sp.slots);
    g.rank = rank;
    g.ranks = ranks;
    SharedTile<T, C, V> tile{reinterpret_cast<T*>(smem + sp.tile) + t * (C + 1) * V};
    for (int m = first; m < a.maps; m += stride)
      forward_map<scalar_t, C, kStandard>(a, m, g, tile, tp, gm, out);
  } else {
    const CtaGroup<T> g{t, warps, scratch};
    RegisterTile<T, C, V> tile;
    for (int m = first; m < a.maps; m += stride)
      forward_map<scalar_t, C, kStandard>(a, m, g, tile, tp, gm, out);
  }
  finish_loss(a, reinterpret_cast<T*>(smem + sp.groups));
  if constexpr (kCluster) cluster_sync();  // no CTA leaves while another may read its slots
}

}  // namespace dsnt_cuda
