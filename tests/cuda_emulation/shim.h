// Host emulation of the CUDA execution model, for running csrc/cuda/dsnt_kernel.cu without a GPU
// (tests/cuda_emulation/emulate.py): one block at a time, one std::thread per CUDA thread, real
// barriers for __syncthreads / __syncwarp, a buffer per warp for the shuffles, shared memory
// poisoned (0xFF bytes) at each launch so a read before a write shows. It checks the kernels'
// logic, indexing and synchronization, not GPU-only behaviour (memory model, timing, fast math).
#pragma once
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <cstring>
#include <cstdint>
using std::exp;
using std::log;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct emu_uint3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local emu_uint3 threadIdx, blockIdx;
inline thread_local dim3 gridDim, blockDim;

struct EmuBarrier {
  std::mutex m;
  std::condition_variable cv;
  int count = 0, waiting = 0;
  long gen = 0;
  void reset(int n) { count = n; waiting = 0; gen = 0; }
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    long g = gen;
    if (++waiting == count) {
      waiting = 0;
      ++gen;
      cv.notify_all();
    } else {
      cv.wait(lk, [&] { return gen != g; });
    }
  }
};
inline EmuBarrier emu_block_bar;
inline EmuBarrier emu_warp_bar[32];
inline double emu_shfl[32][32];
alignas(16) inline unsigned char emu_smem_buf[1 << 17];
inline size_t emu_smem_size = 0;
inline unsigned char* emu_smem_ptr = nullptr;
inline long emu_syncthreads_calls = 0;

inline void __syncthreads() { emu_block_bar.wait(); }
inline void __syncwarp() { emu_warp_bar[threadIdx.x / 32].wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int off) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  emu_shfl[w][l] = static_cast<double>(v);
  __syncwarp();
  const T r = static_cast<T>(emu_shfl[w][l ^ off]);
  __syncwarp();
  return r;
}

template <typename F>
inline void emu_launch(unsigned grid, unsigned threads, size_t smem, F&& body) {
  if (smem > sizeof(emu_smem_buf)) throw std::runtime_error("emu: smem too big");
  for (unsigned b = 0; b < grid; ++b) {
    // poison shared memory: a read before write shows up as NaN
    std::vector<unsigned char>* buf = new std::vector<unsigned char>(smem, 0xFF);
    emu_smem_ptr = smem ? buf->data() : nullptr;
    emu_smem_size = smem;
    emu_block_bar.reset(threads);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) emu_warp_bar[w].reset(32);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      ts.emplace_back([&, t, b] {
        threadIdx.x = t;
        blockIdx.x = b;
        gridDim = dim3(grid);
        blockDim = dim3(threads);
        body();
      });
    }
    for (auto& th : ts) th.join();
    delete buf;
    emu_smem_ptr = nullptr;
  }
}
