// Host emulation of the CUDA execution model: CUDA kernels compiled as host C++ (-x c++
// -DDSNT_CUDA_EMULATION; csrc/cuda/launch.cuh includes this file) run on the CPU, one
// std::thread per CUDA thread. What it models, and what a sanitizer (TSan, ASan + UBSan) then sees:
//   - blocks run several at once (DSNT_EMU_BLOCKS, default 4; a cluster's blocks always
//     together), so races between blocks on global memory show under TSan;
//   - each block gets its own dynamic shared memory, exactly the launch's size (ASan sees
//     overruns), filled with 0xFF bytes (NaN for floats) so a read before a write shows;
//   - __syncthreads, __syncwarp and cluster_sync are barriers that order memory;
//   - shuffles and votes exchange values among the lanes of their mask only, and order nothing:
//     they spin on relaxed atomics and sleep on a futex, both invisible to TSan as
//     synchronization, so a kernel that counts on a shuffle to order shared memory is reported;
//   - misuse fails the launch loudly (a C++ exception out of the launch, never a hang): a lane
//     outside the mask calling a warp collective, lanes of one mask in different collectives,
//     a lane that returned while others wait for it, a barrier some threads left by returning,
//     a wait longer than DSNT_EMU_TIMEOUT seconds (default 60: a deadlock).
// It checks the kernels' logic, indexing and synchronization, not GPU-only behaviour: the
// memory model (x86 orders more than a GPU), timing, fast math, register or occupancy limits.
// Rules for kernels compiled through it: tests/cuda_emulation/README.md.
#pragma once

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

// The float overloads, as CUDA's math headers provide them (::exp alone is double).
using std::exp;
using std::log;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared memory would be one array for all blocks and launches, never poisoned.
#define __shared__                                                                           \
  static_assert(false,                                                                       \
                "static __shared__ memory is not emulated: carve it from dynamic_smem<T>() " \
                "(csrc/cuda/launch.cuh)");

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct EmuStream;
using cudaStream_t = EmuStream*;
constexpr int warpSize = 32;

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {

// Thrown inside a CUDA thread to unwind it once its launch has failed (the reason is recorded).
struct Abort {};

struct Launch {
  std::atomic<bool> failed{false};
  std::mutex mutex;  // guards message; taken on the failure path only
  std::string message;
  double timeout_s = 60;

  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!failed.load(std::memory_order_relaxed)) {
      message = why;
      failed.store(true, std::memory_order_relaxed);
    }
  }
};

// Where threads sleep until a condition may hold. It orders nothing: the futex and these relaxed
// counters are invisible to TSan, so the only happens-before edges are those each primitive below
// makes with its own acquire / release atomics.
struct WaitQueue {
  std::atomic<uint32_t> tick{0};
  std::atomic<uint32_t> sleepers{0};

  // A locked add on x86, so it also keeps a store before it from passing a load after it: two
  // threads that arrive together cannot both miss each other and sleep.
  void bump() { tick.fetch_add(1, std::memory_order_relaxed); }
  void wake() {
    if (sleepers.load(std::memory_order_relaxed) != 0) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&tick), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr,
              0);
    }
  }
  void sleep(uint32_t seen) {
    timespec slice{0, 20 * 1000 * 1000};  // a missed wake-up costs at most this
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&tick), FUTEX_WAIT_PRIVATE, seen, &slice, nullptr, 0);
  }
};

// Warp collectives (shuffles, votes, __syncwarp). The k-th collective a lane calls with mask M
// meets the k-th collective with mask M of every other lane of M: each lane keeps, per mask it
// uses, a channel counting its rounds. All lanes of M wait for each other in every round, so none
// is more than one round ahead and two value slots per channel (by round parity) suffice.
enum class Op : uint32_t { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };
constexpr const char* kOpNames[] = {"__shfl_sync",   "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                    "__ballot_sync", "__any_sync",     "__all_sync",       "__syncwarp"};
constexpr int kChannels = 8;  // distinct masks one lane may use in a kernel

struct Channel {
  std::atomic<uint32_t> mask{0};
  std::atomic<uint32_t> entered{0};  // rounds this lane has entered with this mask
  std::atomic<uint64_t> value[2]{};  // what it published, by round parity
  std::atomic<uint32_t> op[2]{};     // which collective, to check that the lanes agree
};

struct Warp {
  unsigned lanes = 32;  // lanes that exist (a block's last warp may be partial)
  Channel channels[32][kChannels];
  std::atomic<int> used[32]{};  // channels each lane has opened
  std::atomic<bool> exited[32]{};
  WaitQueue queue;

  // Lane's channel for mask, or nullptr while it has never used that mask. Only the lane itself
  // opens channels (mask first, then the count), so a reader sees a complete one.
  Channel* find(unsigned lane, unsigned mask) {
    const int n = used[lane].load(std::memory_order_relaxed);
    for (int i = 0; i < n; ++i) {
      if (channels[lane][i].mask.load(std::memory_order_relaxed) == mask) return &channels[lane][i];
    }
    return nullptr;
  }
};

// A barrier of `expected` threads that orders memory: what any thread did before arriving
// happens before what any thread does after leaving (acquire / release, which TSan sees).
struct Barrier {
  const char* name;
  uint32_t expected;
  std::atomic<uint32_t> arrived{0};
  std::atomic<uint32_t> generation{0};
  std::atomic<uint32_t> exited{0};  // threads that returned from the kernel: never arriving
  WaitQueue queue;

  Barrier(const char* n, uint32_t e) : name(n), expected(e) {}
  void arrive_and_wait();
  void leave() {
    exited.fetch_add(1, std::memory_order_release);
    queue.bump();
    queue.wake();
  }
};

struct Block {
  uint3 index;
  unsigned rank;  // in its cluster
  size_t smem_size;
  std::unique_ptr<unsigned char[]> smem;
  Barrier barrier;
  std::unique_ptr<Warp[]> warps;
  std::atomic<uint32_t> left{0};  // threads done; the last one retires the shared memory

  Block(uint3 i, unsigned r, size_t smem_bytes, unsigned threads)
      : index(i),
        rank(r),
        smem_size(smem_bytes),
        smem(new unsigned char[smem_bytes]),
        barrier("__syncthreads", threads),
        warps(new Warp[(threads + 31) / 32]) {
    std::memset(smem.get(), 0xFF, smem_bytes);
    const unsigned nwarps = (threads + 31) / 32;
    warps[nwarps - 1].lanes = threads - 32 * (nwarps - 1);
  }
};

struct Cluster {
  std::vector<std::unique_ptr<Block>> blocks;
  Barrier barrier;
  explicit Cluster(uint32_t threads) : barrier("cluster_sync", threads) {}
};

// The emulated CUDA thread running on this std::thread.
struct Thread {
  Launch* launch;
  Cluster* cluster;
  Block* block;
  Warp* warp;
  unsigned lane;
};
inline thread_local Thread* self = nullptr;

inline std::string where() {
  const auto& b = blockIdx;
  const auto& t = threadIdx;
  return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) +
         ") thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + "): ";
}

[[noreturn]] inline void fail(const std::string& why) {
  self->launch->fail(where() + why);
  throw Abort{};
}

// Waits until done(), sleeping on q. stuck() returns why done() can never hold, or "".
template <typename Done, typename Stuck>
void wait(WaitQueue& q, Done done, Stuck stuck, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  for (int tries = 0; !done(); ++tries) {
    if (self->launch->failed.load(std::memory_order_relaxed)) throw Abort{};
    // done() again after stuck(): the threads seen gone may have passed this very barrier (and
    // run to the end of the kernel) between the two looks, which is no divergence.
    if (const std::string why = stuck(); !why.empty() && !done()) fail(why);
    if (tries == 0) {  // the others are often just behind: let them run first
      sched_yield();
      continue;
    }
    q.sleepers.fetch_add(1, std::memory_order_relaxed);
    const uint32_t seen = q.tick.load(std::memory_order_relaxed);
    if (!done()) q.sleep(seen);
    q.sleepers.fetch_sub(1, std::memory_order_relaxed);
    const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start;
    if (waited.count() > self->launch->timeout_s) {
      fail(std::string(what) + ": still waiting after " + std::to_string(waited.count()) +
           " s (a deadlock? DSNT_EMU_TIMEOUT sets the limit)");
    }
  }
}

inline void Barrier::arrive_and_wait() {
  // The generation cannot change before this thread arrives.
  const uint32_t gen = generation.load(std::memory_order_relaxed);
  if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == expected) {
    arrived.store(0, std::memory_order_relaxed);
    generation.fetch_add(1, std::memory_order_release);
    queue.bump();
    queue.wake();
    return;
  }
  wait(
      queue, [&] { return generation.load(std::memory_order_acquire) != gen; },
      [&] {
        const uint32_t gone = exited.load(std::memory_order_acquire);
        return gone == 0 ? std::string()
                         : std::string(name) + ": " + std::to_string(gone) +
                               " thread(s) returned from the kernel and can never arrive (a barrier in "
                               "divergent code)";
      },
      name);
}

inline std::string hex(unsigned v) {
  char s[16];
  std::snprintf(s, sizeof s, "0x%08x", v);
  return s;
}

// Enters this lane's next collective with `mask`, publishing `mine`; returns once every lane of
// mask has entered the same one. Lane m's value is then value_of(m, mask, parity).
// Only __syncwarp orders memory (acquire / release); the rest are relaxed, as on the GPU.
inline int enter(Op op, unsigned mask, uint64_t mine) {
  Thread& t = *self;
  Warp& w = *t.warp;
  const unsigned lane = t.lane;
  const char* name = kOpNames[static_cast<int>(op)];
  if (!(mask >> lane & 1u))
    fail(std::string(name) + ": lane " + std::to_string(lane) + " calls it with mask " + hex(mask) +
         ", which leaves it out");
  const unsigned exist = w.lanes == 32 ? ~0u : (1u << w.lanes) - 1;
  if (mask & ~exist) {
    fail(std::string(name) + ": mask " + hex(mask) + " names lanes this warp does not have (it has " +
         std::to_string(w.lanes) + ")");
  }
  Channel* mine_ch = w.find(lane, mask);
  if (mine_ch == nullptr) {
    const int n = w.used[lane].load(std::memory_order_relaxed);
    if (n == kChannels)
      fail(std::string(name) + ": a lane used more than " + std::to_string(kChannels) + " masks");
    mine_ch = &w.channels[lane][n];
    mine_ch->mask.store(mask, std::memory_order_relaxed);
    w.used[lane].store(n + 1, std::memory_order_relaxed);
  }
  const uint32_t round = mine_ch->entered.load(std::memory_order_relaxed);
  const int parity = round & 1;
  const bool orders = op == Op::SyncWarp;
  mine_ch->value[parity].store(mine, std::memory_order_relaxed);
  mine_ch->op[parity].store(static_cast<uint32_t>(op), std::memory_order_relaxed);
  mine_ch->entered.store(round + 1, orders ? std::memory_order_release : std::memory_order_relaxed);
  w.queue.bump();
  const auto all_in = [&] {
    for (unsigned m = 0; m < 32; ++m) {
      if (!(mask >> m & 1u)) continue;
      const Channel* c = w.find(m, mask);
      if (c == nullptr ||
          c->entered.load(orders ? std::memory_order_acquire : std::memory_order_relaxed) <= round) {
        return false;
      }
    }
    return true;
  };
  if (all_in()) {
    w.queue.wake();
  } else {
    wait(
        w.queue, all_in,
        [&] {
          for (unsigned m = 0; m < 32; ++m) {
            if (!(mask >> m & 1u) || !w.exited[m].load(std::memory_order_relaxed)) continue;
            const Channel* c = w.find(m, mask);
            if (c == nullptr || c->entered.load(std::memory_order_relaxed) <= round) {
              return std::string(name) + ": lane " + std::to_string(m) + " of mask " + hex(mask) +
                     " returned from the kernel before reaching it";
            }
          }
          return std::string();
        },
        name);
  }
  for (unsigned m = 0; m < 32; ++m) {
    if (!(mask >> m & 1u)) continue;
    const uint32_t theirs = w.find(m, mask)->op[parity].load(std::memory_order_relaxed);
    if (theirs != static_cast<uint32_t>(op)) {
      fail("lanes disagree on collective #" + std::to_string(round) + " of mask " + hex(mask) + ": lane " +
           std::to_string(lane) + " is in " + name + ", lane " + std::to_string(m) + " in " +
           kOpNames[theirs]);
    }
  }
  return parity;
}

inline uint64_t value_of(unsigned lane, unsigned mask, int parity) {
  return self->warp->find(lane, mask)->value[parity].load(std::memory_order_relaxed);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp collectives move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline unsigned lane_id() { return self->lane; }

inline void check_width(const char* name, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(name) + ": width " + std::to_string(width) + " is not a power of 2 up to 32");
  }
}

template <typename T>
T shuffle(Op op, unsigned mask, T v, unsigned src) {
  const int parity = enter(op, mask, to_bits(v));
  if (!(mask >> src & 1u)) {
    fail(std::string(kOpNames[static_cast<int>(op)]) + ": lane " + std::to_string(lane_id()) +
         " reads lane " + std::to_string(src) + ", which is not in mask " + hex(mask));
  }
  return from_bits<T>(value_of(src, mask, parity));
}

// The bits of mask whose lanes passed a nonzero predicate to this vote.
inline unsigned vote(Op op, unsigned mask, int predicate) {
  const int parity = enter(op, mask, predicate != 0);
  unsigned ballot = 0;
  for (unsigned m = 0; m < 32; ++m) {
    if ((mask >> m & 1u) && value_of(m, mask, parity) != 0) ballot |= 1u << m;
  }
  return ballot;
}

inline unsigned char* block_smem() { return self->block->smem.get(); }

inline void cluster_sync() { self->cluster->barrier.arrive_and_wait(); }
inline unsigned cluster_block_rank() { return self->block->rank; }
inline unsigned cluster_num_blocks() { return static_cast<unsigned>(self->cluster->blocks.size()); }

template <typename T>
T* cluster_shared_ptr(T* p, unsigned rank) {
  const Block& me = *self->block;
  const auto* c = reinterpret_cast<const unsigned char*>(p);
  if (rank >= cluster_num_blocks()) {
    fail("cluster_shared_ptr: rank " + std::to_string(rank) + ", but the cluster has " +
         std::to_string(cluster_num_blocks()) + " blocks");
  }
  if (c < me.smem.get() || c > me.smem.get() + me.smem_size) {
    fail("cluster_shared_ptr: the pointer is not into this block's dynamic shared memory");
  }
  return reinterpret_cast<T*>(self->cluster->blocks[rank]->smem.get() + (c - me.smem.get()));
}

// A block's shared memory dies with its last thread: poisoned, so another block of the cluster
// still reading it (no cluster_sync before the owner returned) reads NaN, and ASan or TSan
// report it. The last leaver has acquired every other thread's departure (Block::left).
inline void retire_smem(Block& b) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(b.smem.get(), b.smem_size);
#else
  std::memset(b.smem.get(), 0xFF, b.smem_size);
#endif
}

inline double env_number(const char* name, double fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::atof(s) : fallback;
}

inline void run_thread(Launch& launch, Cluster& cluster, Block& block, unsigned tid, dim3 bdim, dim3 grid,
                       const std::function<void()>& body) {
  Thread t{&launch, &cluster, &block, &block.warps[tid / 32], tid % 32};
  self = &t;
  threadIdx = {tid % bdim.x, tid / bdim.x % bdim.y, tid / (bdim.x * bdim.y)};
  blockIdx = block.index;
  blockDim = bdim;
  gridDim = grid;
  try {
    body();
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    launch.fail(where() + "threw " + e.what());
  } catch (...) {
    launch.fail(where() + "threw an unknown exception");
  }
  // Whoever waits for this thread must learn that it will never come.
  t.warp->exited[t.lane].store(true, std::memory_order_relaxed);
  t.warp->queue.bump();
  t.warp->queue.wake();
  block.barrier.leave();
  cluster.barrier.leave();
  const unsigned threads = bdim.x * bdim.y * bdim.z;
  if (block.left.fetch_add(1, std::memory_order_acq_rel) + 1 == threads && cluster.blocks.size() > 1) {
    retire_smem(block);
  }
  self = nullptr;
}

// Runs body() as every thread of a grid. Throws std::runtime_error when the launch is invalid
// (as cudaLaunch* would refuse it) or any thread failed (the first failure's message).
inline void launch(dim3 grid, dim3 block, size_t smem, dim3 cluster, const std::function<void()>& body) {
  const auto refuse = [](const std::string& why) { throw std::runtime_error("emulated launch: " + why); };
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) refuse("bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) refuse("bad grid size");
  if (cluster.x == 0 || cluster.y == 0 || cluster.z == 0 || grid.x % cluster.x || grid.y % cluster.y ||
      grid.z % cluster.z) {
    refuse("cluster dims must divide the grid dims");
  }
  const unsigned cluster_size = cluster.x * cluster.y * cluster.z;
  if (cluster_size > 8)
    refuse("cluster of " + std::to_string(cluster_size) + " blocks; at most 8 are portable");
  if (smem > 227 * 1024) refuse("dynamic shared memory above sm_90's 227 KB per block");

  Launch state;
  state.timeout_s = env_number("DSNT_EMU_TIMEOUT", 60);
  const unsigned per_wave =
      std::max(1u, static_cast<unsigned>(env_number("DSNT_EMU_BLOCKS", 4)) / cluster_size);
  const dim3 clusters(grid.x / cluster.x, grid.y / cluster.y, grid.z / cluster.z);
  const uint64_t total = uint64_t{clusters.x} * clusters.y * clusters.z;
  for (uint64_t first = 0; first < total && !state.failed.load(); first += per_wave) {
    // Blocks of a wave run at once; a wave starts after the previous one ended.
    std::vector<std::unique_ptr<Cluster>> wave;
    for (uint64_t c = first; c < std::min<uint64_t>(total, first + per_wave); ++c) {
      const uint3 origin{static_cast<unsigned>(c % clusters.x) * cluster.x,
                         static_cast<unsigned>(c / clusters.x % clusters.y) * cluster.y,
                         static_cast<unsigned>(c / (uint64_t{clusters.x} * clusters.y)) * cluster.z};
      auto& cl = wave.emplace_back(std::make_unique<Cluster>(threads * cluster_size));
      for (unsigned r = 0; r < cluster_size; ++r) {
        const uint3 index{origin.x + r % cluster.x, origin.y + r / cluster.x % cluster.y,
                          origin.z + r / (cluster.x * cluster.y)};
        cl->blocks.push_back(std::make_unique<Block>(index, r, smem, threads));
      }
    }
    std::vector<std::thread> running;
    try {
      for (auto& cl : wave) {
        for (auto& b : cl->blocks) {
          for (unsigned tid = 0; tid < threads; ++tid) {
            running.emplace_back(run_thread, std::ref(state), std::ref(*cl), std::ref(*b), tid, block, grid,
                                 std::cref(body));
          }
        }
      }
    } catch (const std::system_error& e) {  // out of threads: the started ones must still end
      state.fail(std::string("cannot start another thread (") + e.what() + "); fewer DSNT_EMU_BLOCKS?");
    }
    for (auto& th : running) th.join();
#if defined(__SANITIZE_ADDRESS__)
    for (auto& cl : wave) {
      for (auto& b : cl->blocks) ASAN_UNPOISON_MEMORY_REGION(b->smem.get(), b->smem_size);
    }
#endif
  }
  if (state.failed.load()) throw std::runtime_error("emulated kernel failed: " + state.message);
}

}  // namespace emu

// ---- The CUDA intrinsics the shim provides (csrc/cuda/ kernels may use these and no others).
inline void __syncthreads() { emu::self->block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::enter(emu::Op::SyncWarp, mask, 0); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  emu::check_width("__shfl_sync", width);
  const unsigned lane = emu::lane_id();
  return emu::shuffle(emu::Op::Shfl, mask, v,
                      (lane & ~(width - 1u)) + (static_cast<unsigned>(src_lane) & (width - 1u)));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  emu::check_width("__shfl_up_sync", width);
  const unsigned lane = emu::lane_id();
  return emu::shuffle(emu::Op::ShflUp, mask, v, (lane & (width - 1u)) >= delta ? lane - delta : lane);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  emu::check_width("__shfl_down_sync", width);
  const unsigned lane = emu::lane_id();
  return emu::shuffle(emu::Op::ShflDown, mask, v,
                      (lane & (width - 1u)) + delta < unsigned(width) ? lane + delta : lane);
}

// A lane may read an earlier width-group, not a later one (it gets its own value then).
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  emu::check_width("__shfl_xor_sync", width);
  const unsigned lane = emu::lane_id();
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  return emu::shuffle(emu::Op::ShflXor, mask, v, src >= (lane & ~(width - 1u)) + width ? lane : src);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return emu::vote(emu::Op::Ballot, mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) { return emu::vote(emu::Op::Any, mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return emu::vote(emu::Op::All, mask, predicate) == mask;
}

// Relaxed, as CUDA's atomics: no ordering of other memory.
template <typename T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v, std::memory_order_relaxed);
}

// A fence that orders this thread's memory accesses before and after it with every other fence
// (CUDA's __threadfence is cumulative at device scope). Modelled as an acquire-release RMW of one
// variable, which ThreadSanitizer understands (it does not model std::atomic_thread_fence).
inline std::atomic<unsigned> emu_fence_word{0};
inline void __threadfence() { emu_fence_word.fetch_add(0u, std::memory_order_acq_rel); }
