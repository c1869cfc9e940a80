// Tests of the CUDA emulator itself (shim.h), run by tests/test_cuda_emulator.py: kernels with
// known results, kernels that break a rule of csrc/cuda/launch.cuh (each must fail loudly, never
// hang) and kernels with a race that TSan or ASan must report. Emulation only (-x c++).
//   selftest <case>   exit 0: the case ran and its results were right; 1: wrong results;
//                     2: the launch failed (its message on stderr); 3: no such case.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cuda/cluster.cuh"
#include "cuda/launch.cuh"

using dsnt_cuda::dynamic_smem;
using dsnt_cuda::launch;
using dsnt_cuda::LaunchConfig;

namespace {

constexpr unsigned kFull = 0xffffffffu;

// ---- Kernels with known results.

// Every shuffle and vote, with widths and with half-warp masks. 8 results per thread.
__global__ void shuffles(int* out) {
  const int t = threadIdx.x;
  const int lane = t % 32;
  int* o = out + 8 * t;
  o[0] = __shfl_sync(kFull, 10 * t, 3);
  o[1] = __shfl_sync(kFull, 10 * t, lane + 1, 8);  // the next lane, wrapping within groups of 8
  o[2] = __shfl_up_sync(kFull, t, 2, 16);
  o[3] = __shfl_down_sync(kFull, t, 4);
  o[4] = __shfl_xor_sync(kFull, t, 5);
  o[5] = __shfl_xor_sync(kFull, t, 16, 16);  // the later group of 16 is out of reach: own value
  o[6] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  if (lane < 16) {
    __syncwarp(0x0000ffffu);
    o[7] = __shfl_xor_sync(0x0000ffffu, t, 1) + 1000 * __any_sync(0x0000ffffu, lane == 7) +
           10000 * __all_sync(0x0000ffffu, lane < 16);
  } else {
    o[7] = __shfl_down_sync(0xffff0000u, t, 1, 16) + 1000 * __any_sync(0xffff0000u, lane == 7) +
           10000 * __all_sync(0xffff0000u, lane < 20);
  }
}

bool check_shuffles() {
  const int threads = 64;
  std::vector<int> out(8 * threads, -1);
  launch(shuffles, {dim3(1), dim3(threads)}, out.data());
  int every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1 << l;
  bool ok = true;
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, warp = t - lane;
    const int in16 = lane & 15;
    const int expected[8] = {
        10 * (warp + 3),       10 * (warp + (lane & ~7) + ((lane + 1) & 7)),
        in16 >= 2 ? t - 2 : t, lane + 4 < 32 ? t + 4 : t,
        warp + (lane ^ 5),     lane < 16 ? t : t - 16,
        every_third,           lane < 16 ? warp + (lane ^ 1) + 1000 + 10000 : (in16 + 1 < 16 ? t + 1 : t),
    };
    for (int k = 0; k < 8; ++k) {
      if (out[8 * t + k] != expected[k]) {
        std::fprintf(stderr, "thread %d result %d: got %d, expected %d\n", t, k, out[8 * t + k], expected[k]);
        ok = false;
      }
    }
  }
  return ok;
}

// Lane 0 writes shared memory, the other lanes read it after a __syncwarp (which orders memory)
// or after a shuffle from lane 0 (which does not: TSan must report that one).
__global__ void handoff(float* out, bool syncwarp) {
  float* s = dynamic_smem<float>();
  if (threadIdx.x == 0) s[0] = 42.0f;
  if (syncwarp) {
    __syncwarp();
  } else {
    (void)__shfl_sync(kFull, 0, 0);
  }
  out[threadIdx.x] = s[0];
}

bool run_handoff(bool syncwarp) {
  std::vector<float> out(32, 0.0f);
  launch(handoff, {dim3(1), dim3(32), sizeof(float)}, out.data(), syncwarp);
  for (float v : out) {
    if (syncwarp && v != 42.0f) return false;
  }
  return true;
}

// A fresh, poisoned shared buffer for every block: read before written, every byte is 0xFF.
__global__ void read_before_write(uint32_t* out) {
  uint32_t* s = dynamic_smem<uint32_t>();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = blockIdx.x;
}

bool check_smem_poisoned() {
  const int blocks = 9, threads = 32;  // more blocks than run at once: several waves
  std::vector<uint32_t> out(blocks * threads, 0);
  launch(read_before_write, {dim3(blocks), dim3(threads), threads * sizeof(uint32_t)}, out.data());
  for (uint32_t v : out) {
    if (v != 0xffffffffu) return false;
  }
  return true;
}

// Thread 0 of each block adds 1 to one counter; blocks run at once, so only atomicAdd is safe.
__global__ void count(int* counter, bool atomic) {
  if (threadIdx.x != 0) return;
  if (atomic) {
    atomicAdd(counter, 1);
  } else {
    *counter += 1;
  }
}

bool run_count(bool atomic) {
  int counter = 0;
  launch(count, {dim3(4), dim3(32)}, &counter, atomic);
  return !atomic || counter == 4;
}

// A 2x2 cluster: each block writes its shared memory, then reads the next rank's through DSMEM.
// sync_before_read / sync_before_return: drop one cluster_sync for the race tests.
__global__ void ring(int* out, int* ranks, bool sync_before_read, bool sync_before_return) {
  int* mine = dynamic_smem<int>();
  const unsigned rank = dsnt_cuda::cluster_block_rank(), n = dsnt_cuda::cluster_num_blocks();
  const unsigned block = blockIdx.y * gridDim.x + blockIdx.x;
  mine[threadIdx.x] = 100 * static_cast<int>(block) + threadIdx.x;
  if (sync_before_read) dsnt_cuda::cluster_sync();
  const int* theirs = dsnt_cuda::cluster_shared_ptr(mine, (rank + 1) % n);
  out[block * blockDim.x + threadIdx.x] = theirs[threadIdx.x];
  if (threadIdx.x == 0) ranks[block] = static_cast<int>(10 * rank + n);
  if (sync_before_return) dsnt_cuda::cluster_sync();
}

bool run_ring(bool sync_before_read, bool sync_before_return) {
  const unsigned gx = 4, gy = 2, threads = 32;
  std::vector<int> out(gx * gy * threads, -1), ranks(gx * gy, -1);
  const LaunchConfig config{dim3(gx, gy), dim3(threads), threads * sizeof(int), nullptr, dim3(2, 2)};
  launch(ring, config, out.data(), ranks.data(), sync_before_read, sync_before_return);
  if (!sync_before_read || !sync_before_return) return true;  // only the race matters then
  bool ok = true;
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      const unsigned rank = bx % 2 + 2 * (by % 2), next = (rank + 1) % 4;  // x fastest in a cluster
      const unsigned nx = bx - bx % 2 + next % 2, ny = by - by % 2 + next / 2;
      const unsigned block = by * gx + bx, neighbour = ny * gx + nx;
      ok = ok && ranks[block] == static_cast<int>(10 * rank + 4);
      for (unsigned t = 0; t < threads; ++t)
        ok = ok && out[block * threads + t] == static_cast<int>(100 * neighbour + t);
    }
  }
  return ok;
}

// ---- Kernels that break a rule: each launch must fail with a message.

__global__ void lane_returns_before_shuffle(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
}

// Lane 3 names only lane 0; the others wait for lane 3 until its failure stops them.
__global__ void lane_outside_mask(int* out) {
  out[threadIdx.x] = static_cast<int>(__ballot_sync(threadIdx.x == 3 ? 0x1u : kFull, 1));
}

// Lanes 0-15 meet among themselves and return; lanes 16-31 wait for them in vain.
__global__ void masks_disagree(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(threadIdx.x < 16 ? 0x0000ffffu : kFull, 1, 1);
}

__global__ void collectives_disagree(int* out) {
  out[threadIdx.x] =
      threadIdx.x < 16 ? __shfl_xor_sync(kFull, 1, 1) : static_cast<int>(__ballot_sync(kFull, 1));
}

__global__ void barrier_after_return(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Thread 32 waits at __syncthreads for lanes 1-31 of its warp, which wait in a shuffle for it.
__global__ void deadlock(int* out) {
  if (threadIdx.x > 32) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
  } else {
    __syncthreads();
  }
}

__global__ void smem_overrun(int*) { dynamic_smem<float>()[threadIdx.x + 1] = 0.0f; }

bool run_broken(void (*kernel)(int*), const LaunchConfig& config) {
  std::vector<int> out(config.grid.x * config.block.x, 0);
  launch(kernel, config, out.data());
  return true;
}

const LaunchConfig kOneWarp{dim3(1), dim3(32), 32 * sizeof(float)};
const LaunchConfig kTwoWarps{dim3(1), dim3(64), 64 * sizeof(float)};

const std::map<std::string, std::function<bool()>> kCases = {
    {"shuffles", check_shuffles},
    {"syncwarp_orders_memory", [] { return run_handoff(true); }},
    {"shuffle_orders_nothing", [] { return run_handoff(false); }},
    {"smem_poisoned_per_block", check_smem_poisoned},
    {"atomic_add_across_blocks", [] { return run_count(true); }},
    {"blocks_race_on_global", [] { return run_count(false); }},
    {"cluster_ring", [] { return run_ring(true, true); }},
    {"cluster_read_without_sync", [] { return run_ring(false, true); }},
    {"cluster_return_without_sync", [] { return run_ring(true, false); }},
    {"lane_returns_before_shuffle", [] { return run_broken(lane_returns_before_shuffle, kOneWarp); }},
    {"lane_outside_mask", [] { return run_broken(lane_outside_mask, kOneWarp); }},
    {"masks_disagree", [] { return run_broken(masks_disagree, kOneWarp); }},
    {"collectives_disagree", [] { return run_broken(collectives_disagree, kOneWarp); }},
    {"barrier_after_return", [] { return run_broken(barrier_after_return, kTwoWarps); }},
    {"deadlock", [] { return run_broken(deadlock, kTwoWarps); }},
    {"cluster_too_large",
     [] { return run_broken(barrier_after_return, {dim3(16), dim3(64), 0, nullptr, dim3(16)}); }},
    {"smem_overrun", [] { return run_broken(smem_overrun, kOneWarp); }},
};

}  // namespace

int main(int argc, char** argv) {
  const auto it = argc == 2 ? kCases.find(argv[1]) : kCases.end();
  if (it == kCases.end()) {
    std::fprintf(stderr, "usage: selftest <case>; cases:");
    for (const auto& [name, run] : kCases) std::fprintf(stderr, " %s", name.c_str());
    std::fprintf(stderr, "\n");
    return 3;
  }
  try {
    if (!it->second()) {
      std::fprintf(stderr, "%s: wrong results\n", argv[1]);
      return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", argv[1], e.what());
    return 2;
  }
  return 0;
}
