// How the threads of a group cover a map: the tile layout, shared by every size class.
//
// A map is seen as rows of x: `rows = S_y * S_z` rows of S_x elements (a 1-D map: one row). A
// row longer than `row_width = cols * V` elements is cut into `segs` virtual rows, so the map
// has `vrows = rows * segs` virtual rows of at most row_width elements. Thread t of a group of
// G threads owns chunk column `t % cols` (V consecutive x, 16 bytes of logits) of the virtual
// rows `t / cols + c * tile_rows`, c = 0..C-1 (tile_rows = G / cols). So:
//   - a chunk never straddles two rows: its x coordinates are consecutive and its y, z are
//     those of its row, and a thread's x is the same in every chunk (or offset by whole
//     virtual rows): no per-element integer division anywhere;
//   - a warp reads 32 consecutive chunks of a row (or of consecutive rows);
//   - the per-row facts (coordinates, x offset, memory offset, number of valid x) are looked
//     up once per chunk in a table of row records built once per CTA (every map of a launch has
//     the same geometry).
// A group holds `slice_vrows = tile_rows * C` virtual rows: the whole map in the warp and block
// classes, one CTA's slice of it in the cluster class (slice r = virtual rows
// [r * slice_vrows, (r + 1) * slice_vrows)), one tile of a streamed pass in the streamed class.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dsnt_cuda {

struct TileLayout {
  int dims = 1;
  int size[kMaxSpatialDims] = {1, 1, 1};  // S_x, S_y, S_z
  int map_size = 1;                       // N
  int rows = 1;                           // S_y * S_z
  int vec = 4;                            // V: elements per chunk
  int chunks = 8;                         // C: chunks per thread (the kernel's constant)
  int group = 32;                         // G: threads per group
  int cols = 1;                           // chunk columns of a virtual row
  int row_width = 4;                      // cols * V
  int segs = 1;                           // virtual rows per row
  int vrows = 1;                          // rows * segs
  int tile_rows = 1;                      // G / cols
  int slice_vrows = 1;                    // tile_rows * C
  // Element offsets in a map: x * stride_x + y * stride_y + z * stride_z.
  int64_t stride_x = 1, stride_y = 1, stride_z = 1;
  // Every chunk of the tile is a whole, 16-byte aligned chunk of the map relative to its base
  // (stride_x == 1, aligned rows, no padding chunk): a map whose base is 16-byte aligned is
  // read in 16-byte vectors (checked per map in the kernels).
  bool whole_chunks = false;
  // No padding chunk and S_x a multiple of V: every chunk of the (contiguous) gradient is a whole,
  // aligned 16-byte store.
  bool whole_out_chunks = false;
  FastDivmod segs_div, size_y_div;  // virtual row -> (row, segment), row -> (z, y)
};

// Per virtual row, what the element passes need (one 16-byte load for float).
template <typename T>
struct alignas(16) RowCoords {
  T uy, uz;   // centred y, z of the row (0 for absent axes); first, so one 8-byte load reads both
  T xoff;     // u_x of the row's first element: seg * row_width - (S_x - 1) / 2
  int xbase;  // index of the row's first element in the x tables of this group
};

// Per virtual row, what the loads need.
struct alignas(16) RowMemory {
  int offset;             // element offset of the row's first element in the (strided) logits map
  int xcount;             // valid x in this virtual row (0: a padding row beyond the map or slice)
  int contiguous_offset;  // the same element in a contiguous map (the gradient)
  int pad_;
};

// The record of virtual row `v` (of the whole map) for a group whose x tables start at
// x index `x_origin` (0, except 1-D slices of the cluster class).
template <typename T>
DSNT_DEV void row_record(const TileLayout& L, int v, int x_origin, RowCoords<T>& rc, RowMemory& rm) {
  const bool live = v < L.vrows;
  const int row = live ? v / L.segs : 0;
  const int seg = live ? v - row * L.segs : 0;
  const int y = row % L.size[1];
  const int z = row / L.size[1];
  const int x0 = seg * L.row_width;
  rc.xoff = static_cast<T>(x0) - centred_offset<T>(L.size[0]);
  rc.uy = L.dims >= 2 ? static_cast<T>(y) - centred_offset<T>(L.size[1]) : T(0);
  rc.uz = L.dims >= 3 ? static_cast<T>(z) - centred_offset<T>(L.size[2]) : T(0);
  rc.xbase = live ? x0 - x_origin : 0;  // a padding row reads (zero-weight) entry 0 onwards
  rm.offset = static_cast<int>(x0 * L.stride_x + y * L.stride_y + z * L.stride_z);  // < 2^31 (host.cu)
  const int left = L.size[0] - x0;
  rm.xcount = live ? (left < L.row_width ? left : L.row_width) : 0;
  rm.contiguous_offset = row * L.size[0] + x0;
  rm.pad_ = 0;
}

}  // namespace dsnt_cuda
