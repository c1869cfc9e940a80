// A thread's share of a map (tile_layout.cuh) and how it moves between memory and the thread:
// C chunks of V elements in the accumulation type, held in registers (warp and block classes)
// or in this CTA's shared memory (cluster class, where a CTA's slice is too large for
// registers). Loads and stores are 16-byte vectors for a map whose base is aligned (decided per
// map); other maps, and strided logits (channels-last: x is not the fastest dim), go through
// an out-of-line element-by-element path, so the vector path is the only one in the hot code.
#pragma once

#include "common.cuh"
#include "tile_layout.cuh"

namespace dsnt_cuda {

template <typename T, int C, int V>
struct RegisterTile {
  T v[C][V];
  DSNT_DEV Vals<T, V> get(int c) const {
    Vals<T, V> r;
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = v[c][k];
    return r;
  }
  DSNT_DEV void put(int c, const Vals<T, V>& r) {
#pragma unroll
    for (int k = 0; k < V; ++k) v[c][k] = r.v[k];
  }
};

// Chunk c of thread t at tile[(t * (C + 1) + c) * V]: every chunk at a fixed offset from the
// thread's own base, so no access needs address arithmetic; the one chunk of padding per thread
// puts the 16-byte accesses of 8 consecutive threads (one shared-memory phase) on distinct banks.
template <typename T, int C, int V>
struct SharedTile {
  T* base;  // tile + t * (C + 1) * V
  DSNT_DEV Vals<T, V> get(int c) const { return *reinterpret_cast<const Vals<T, V>*>(base + c * V); }
  DSNT_DEV void put(int c, const Vals<T, V>& r) { *reinterpret_cast<Vals<T, V>*>(base + c * V) = r; }
};

template <typename scalar_t>
DSNT_DEV bool aligned16(const scalar_t* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The tile of a map that is not read in 16-byte vectors (a misaligned base, x not the fastest
// dim, a row length that is not a multiple of V): element by element, out of line, into a
// buffer the caller then moves into its tile. One call per map, made before anything else is
// live, so the vector path keeps its registers.
template <typename scalar_t, int C>
DSNT_OUT_OF_LINE void load_tile_strided(const scalar_t* map, const RowMemory* memory, int row0, int row_step,
                                        int x_t, int64_t stride_x, scalar_t pad,
                                        Vals<acc_t<scalar_t>, kChunkElems<scalar_t>>* out) {
  for (int c = 0; c < C; ++c) {
    const RowMemory rm = memory[row0 + c * row_step];
    const scalar_t* p = map + rm.offset + x_t * stride_x;
    const int count = rm.xcount - x_t;
#pragma unroll
    for (int k = 0; k < kChunkElems<scalar_t>; ++k) out[c].v[k] = to_acc(k < count ? p[k * stride_x] : pad);
  }
}

// A thread's C chunks (map rows row0 + c * row_step) into `tile`: 16-byte vectors when `vec`
// (then every chunk is whole: TileLayout::whole_chunks).
template <typename scalar_t, int C, class Tile>
DSNT_DEV void load_tile(Tile& tile, const scalar_t* map, const RowMemory* memory, int row0, int row_step,
                        int x_t, int64_t stride_x, bool vec, scalar_t pad) {
  constexpr int V = kChunkElems<scalar_t>;
  using T = acc_t<scalar_t>;
  if (vec) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      // unsigned: a zero-extended 32-bit index costs one IMAD.WIDE.U32 per address
      const uint32_t at = static_cast<uint32_t>(memory[row0 + c * row_step].offset + x_t);
      const RawChunk<scalar_t> raw = *reinterpret_cast<const RawChunk<scalar_t>*>(map + at);
      Vals<T, V> vals;
#pragma unroll
      for (int k = 0; k < V; ++k) vals.v[k] = to_acc(raw.v[k]);
      tile.put(c, vals);
    }
  } else {
    Vals<T, V> buffer[C];
    load_tile_strided<scalar_t, C>(map, memory, row0, row_step, x_t, stride_x, pad, buffer);
#pragma unroll
    for (int c = 0; c < C; ++c) tile.put(c, buffer[c]);
  }
}

// The gradient of a map whose rows are not 16-byte aligned (S_x not a multiple of V), from the
// buffer the element pass filled, out of line.
template <typename scalar_t, int C>
DSNT_OUT_OF_LINE void store_tile_masked(scalar_t* grad_map, const RowMemory* memory, int row0, int row_step,
                                        int x_t, const Vals<acc_t<scalar_t>, kChunkElems<scalar_t>>* vals) {
  for (int c = 0; c < C; ++c) {
    const RowMemory rm = memory[row0 + c * row_step];
    const int count = rm.xcount - x_t;
    scalar_t* p = grad_map + rm.contiguous_offset + x_t;
#pragma unroll
    for (int k = 0; k < kChunkElems<scalar_t>; ++k) {
      if (k < count) p[k] = static_cast<scalar_t>(vals[c].v[k]);
    }
  }
}

// Chunk c of the gradient: stored as a 16-byte vector when `vec` (every chunk whole and
// aligned), else kept in `buffer` for store_tile_masked.
template <typename scalar_t, int C>
DSNT_DEV void store_chunk(scalar_t* grad_map, const RowMemory& rm, int x_t, bool vec, int c,
                          const Vals<acc_t<scalar_t>, kChunkElems<scalar_t>>& vals,
                          Vals<acc_t<scalar_t>, kChunkElems<scalar_t>> (&buffer)[C]) {
  constexpr int V = kChunkElems<scalar_t>;
  if (vec) {
    RawChunk<scalar_t> raw;
#pragma unroll
    for (int k = 0; k < V; ++k) raw.v[k] = static_cast<scalar_t>(vals.v[k]);
    const uint32_t at = static_cast<uint32_t>(rm.contiguous_offset + x_t);
    *reinterpret_cast<RawChunk<scalar_t>*>(grad_map + at) = raw;
  } else {
    buffer[c] = vals;
  }
}

}  // namespace dsnt_cuda
