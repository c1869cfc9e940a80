// What the host hands the kernels: the arguments of one forward / backward launch, the
// normalization and regularizer (runtime values, or compile-time constants in a SASS probe
// build), and where each array lives in the launch's dynamic shared memory. The same functions
// size the shared memory on the host and carve it on the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"
#include "tile_layout.cuh"

namespace dsnt_cuda {

// Which tile a kernel holds, and how many elements a thread of it holds (float64: half).
// The per-map work (set-up, tables, three reductions, ~300 instructions a thread) is spread over
// these elements: the block and cluster classes hold 64, so that it costs a few instructions per
// element; the warp class, whose reductions are shuffles only, 32; the streamed class 16 per
// tile (its per-map work is spread over every tile of a large map); the backward, which has at
// most one reduction, 32.
enum class TileKind : int { Warp = 0, Block = 1, Cluster = 2, Streamed = 3, Backward = 4 };

DSNT_HD constexpr int tile_elements(int elem_size, TileKind kind) {
  const int e =
      kind == TileKind::Block || kind == TileKind::Cluster ? 64 : (kind == TileKind::Streamed ? 16 : 32);
  return elem_size == 8 ? e / 2 : e;
}

DSNT_HD constexpr int tile_chunks(int elem_size, TileKind kind) {
  return tile_elements(elem_size, kind) * elem_size / 16;
}

template <typename scalar_t, TileKind kKind>
constexpr int kChunksPerThread = tile_chunks(static_cast<int>(sizeof(scalar_t)), kKind);

// Questions about the modes, asked of either view below.
template <class M>
struct ModeTests {
  DSNT_DEV const M& self() const { return static_cast<const M&>(*this); }
  DSNT_DEV bool softmax() const { return self().norm() == Normalization::Softmax; }
  DSNT_DEV bool none() const { return self().norm() == Normalization::None; }
  DSNT_DEV bool rectified() const { return !softmax() && !none(); }
  DSNT_DEV bool divergence() const {
    return self().reg() == Regularizer::JS || self().reg() == Regularizer::KL;
  }
  // softmax + JS: the scaled form (docs/math.md §7), with e kept in the tile.
  DSNT_DEV bool softmax_js() const { return softmax() && self().reg() == Regularizer::JS; }
};

// The modes of a launch, as the general kernels read them. A SASS probe build
// (scripts/sass_count.py) defines DSNT_PROBE_NORMALIZATION / DSNT_PROBE_REG, which turn them into
// constants: the compiler then drops every other mode's code and the disassembly is what runs
// for that mode.
struct Modes : ModeTests<Modes> {
  Normalization norm_;
  Regularizer reg_;
  DSNT_DEV Normalization norm() const {
#ifdef DSNT_PROBE_NORMALIZATION
    return Normalization::DSNT_PROBE_NORMALIZATION;
#else
    return norm_;
#endif
  }
  DSNT_DEV Regularizer reg() const {
#ifdef DSNT_PROBE_REG
    return Regularizer::DSNT_PROBE_REG;
#else
    return reg_;
#endif
  }
  static constexpr bool kStandard = false;
};

// The modes of the standard-loss kernels, known at compile time: softmax + JS, and a layout in
// which a thread's x is the same in every chunk (host_common.cuh launches them only then, and
// only without target, beta or variance gradients).
struct StandardModes : ModeTests<StandardModes> {
  DSNT_DEV Normalization norm() const { return Normalization::Softmax; }
  DSNT_DEV Regularizer reg() const { return Regularizer::JS; }
  static constexpr bool kStandard = true;
};

template <bool kStandard>
using ModesOf = std::conditional_t<kStandard, StandardModes, Modes>;

template <bool kStandard>
DSNT_DEV ModesOf<kStandard> modes_view(const Modes& m) {
  if constexpr (kStandard) {
    return StandardModes{};
  } else {
    return m;
  }
}

// Byte offsets of the arrays in a CTA's dynamic shared memory. Tables are per group (per warp in
// the warp class); records are shared by the CTA's groups (one geometry per launch).
struct SmemPlan {
  int x_entries = 0;  // entries of the x tables
  size_t coords = 0;  // RowCoords[slice_vrows + 1]
  size_t memory = 0;  // RowMemory[slice_vrows + 1]
  size_t groups = 0;  // start of the first group's block
  size_t group_bytes = 0;
  // inside a group's block:
  size_t scratch = 0;       // reduction scratch
  uint32_t table[13] = {};  // byte offsets of the table arrays (see smem_plan for the order)
  // after the groups:
  size_t tile = 0;   // the cluster class's shared tile
  size_t slots = 0;  // the cluster class's published totals
  size_t total = 0;
};

// Arrays of the per-group tables, in order: x tables (x_entries each), y, z (S_y, S_z each),
// row tables (slice_vrows + 1 each).
constexpr int kFwdXTables = 2, kFwdRowTables = 2;  // x: g, l; rows: g, l
constexpr int kBwdXTables = 4, kBwdRowTables = 5;  // x: g, l, grad, t; rows: g, l, grad, t_y, t_z

DSNT_HD size_t align16(size_t n) { return (n + 15) / 16 * 16; }

DSNT_HD SmemPlan smem_plan(const TileLayout& L, int groups_per_cta, int warps_per_group, bool backward,
                           bool shared_tile, size_t acc_size, int chunks) {
  SmemPlan p;
  p.x_entries = L.rows == 1 ? L.slice_vrows * L.row_width : L.segs * L.row_width;
  const size_t n_rec = static_cast<size_t>(L.slice_vrows) + 1;
  const size_t rc_size = acc_size == 8 ? 32 : 16;
  p.coords = 0;
  p.memory = align16(n_rec * rc_size);
  p.groups = p.memory + align16(n_rec * 16);
  p.scratch = 0;
  size_t at = align16(acc_size * kRounds * static_cast<size_t>(warps_per_group) * kMaxReduce);
  const int xt = backward ? kBwdXTables : kFwdXTables, rt = backward ? kBwdRowTables : kFwdRowTables;
  int i = 0;
  auto add = [&](int count, size_t entries) {
    for (int j = 0; j < count; ++j, ++i) {
      p.table[i] = static_cast<uint32_t>(at);
      at += align16(acc_size * entries);
    }
  };
  add(xt, p.x_entries);
  add(2, L.size[1]);
  add(2, L.size[2]);
  add(rt, n_rec);
  p.group_bytes = at;
  p.tile = p.groups + p.group_bytes * groups_per_cta;
  // the shared tile: chunks + 1 per thread (map_tile.cuh, SharedTile: one chunk of padding)
  p.slots = p.tile + (shared_tile ? align16(acc_size * L.group * (chunks + 1) * L.vec) : 0);
  p.total = p.slots + (shared_tile ? align16(acc_size * kRounds * kMaxReduce) : 0);
  return p;
}

// Options and per-map inputs common to both directions.
template <typename scalar_t>
struct MapArgs {
  using T = acc_t<scalar_t>;
  const scalar_t* logits;
  int64_t stride_b, stride_l;  // map (b, l) starts at logits + b * stride_b + l * stride_l
  TileLayout layout;
  int maps;              // B * L (< 2^31)
  FastDivmod keypoints;  // m -> (b, l)
  Modes modes;
  CoordLoss coord_loss;
  bool normalized;
  T reg_weight;
  PerMapScalar<T> beta, sigma_t;
  const T* target;  // (maps, dims) contiguous, or null
  const T* mask;    // (maps), or null
  SmemPlan smem;    // where the arrays of the dynamic shared memory live
};

template <typename scalar_t>
struct FwdArgs : MapArgs<scalar_t> {
  using T = acc_t<scalar_t>;
  T* coords;           // (maps, dims)
  T* variance;         // (maps, dims)
  T* reg_losses;       // (maps)
  T* coord_losses;     // (maps), or null without a coordinate loss
  T* stats;            // (maps, 4 + dims)
  T* loss;             // () or null
  unsigned* arrivals;  // zeroed counter of the loss epilogue (last CTA reduces), or null
};

template <typename scalar_t>
struct BwdArgs : MapArgs<scalar_t> {
  using T = acc_t<scalar_t>;
  scalar_t* grad_logits;  // contiguous (maps, N)
  bool vec_out;           // every row of the gradient starts 16-byte aligned
  int slices;             // groups (CTAs) per map: > 1 splits large maps
  const T* coords;
  const T* variance;
  const T* stats;
  const T* grad_coords;        // (maps, dims) or null
  const T* grad_variance;      // (maps, dims) or null
  const T* grad_reg;           // (maps) or null
  const T* grad_coord_losses;  // (maps) or null
  const T* grad_loss;          // () or null
  const T* mask_total;         // () sum of the mask, or null
  bool needs_target_grad;
  bool needs_beta_grad;
  // Per (map, slice): [grad target x, y, z, grad beta] partial sums (reduced on the host when
  // slices > 1), or the final values when slices == 1.
  T* partials;
};

}  // namespace dsnt_cuda
