// The scheduler of the CUDA emulation (see include/emu.h).
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

namespace emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;  // AddressSanitizer clears its shadow at each switch
constexpr unsigned kMaxThreads = 1024;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone, kFailed };

struct Thread {
  ucontext_t ctx;
  uint3 idx;
  State state;
  uint64_t slot[2];  // the values published for the warp exchanges, by parity
  unsigned exchanges;  // warp exchanges done (the lanes of a warp are in step)
};

struct Grid {
  ucontext_t sched;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  const std::function<void()>* body = nullptr;
  int current = -1;
  std::string error;
  std::mt19937 rng{12345};
};

Grid& grid_state() {
  static Grid g;
  return g;
}

cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;

void thread_main() {
  Grid& g = grid_state();
  (*g.body)();
  g.threads[g.current].state = State::kDone;
  // returning resumes uc_link: the scheduler
}

// Switches from the running thread back to the scheduler.
void yield(State s) {
  Grid& g = grid_state();
  Thread& t = g.threads[g.current];
  t.state = s;
  swapcontext(&t.ctx, &g.sched);
}

std::string where(const Thread& t) {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + "), thread (" + std::to_string(t.idx.x) + ", " +
         std::to_string(t.idx.y) + ", " + std::to_string(t.idx.z) + ")";
}

// Runs one block to its end; returns false (and sets g.error) if it fails.
bool run_block(Grid& g, unsigned n) {
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = g.threads[i];
    t.state = State::kRunnable;
    t.exchanges = 0;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = g.stacks[i].get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &g.sched;
    makecontext(&t.ctx, thread_main, 0);
  }
  const unsigned nwarps = (n + 31) / 32;
  for (;;) {
    std::shuffle(order.begin(), order.end(), g.rng);
    bool ran = false;
    for (unsigned i : order) {
      Thread& t = g.threads[i];
      if (t.state != State::kRunnable) continue;
      ran = true;
      g.current = static_cast<int>(i);
      threadIdx = t.idx;
      swapcontext(&g.sched, &t.ctx);
      if (t.state == State::kFailed) return false;
    }
    if (ran) continue;
    // Every thread waits at a barrier or has ended: release what can be released.
    bool released = false, all_done = true, all_at_block = true;
    for (unsigned w = 0; w < nwarps; ++w) {
      const unsigned lo = w * 32, hi = std::min(n, lo + 32);
      unsigned at_warp = 0;
      for (unsigned i = lo; i < hi; ++i) at_warp += g.threads[i].state == State::kAtWarpBarrier;
      if (at_warp == 0) continue;
      if (at_warp != 32) {
        g.error = "a warp-wide shuffle reached by " + std::to_string(at_warp) +
                  " of the 32 lanes of warp " + std::to_string(w) + " (block of " +
                  std::to_string(n) + " threads) in " + where(g.threads[lo]);
        return false;
      }
      for (unsigned i = lo; i < hi; ++i) g.threads[i].state = State::kRunnable;
      released = true;
    }
    if (released) continue;
    for (unsigned i = 0; i < n; ++i) {
      all_done = all_done && g.threads[i].state == State::kDone;
      all_at_block = all_at_block && (g.threads[i].state == State::kAtBlockBarrier ||
                                      g.threads[i].state == State::kDone);
    }
    if (all_done) return true;
    if (!all_at_block) {  // not reachable: every waiting thread is at one of the two barriers
      g.error = "deadlock in " + where(g.threads[0]);
      return false;
    }
    for (unsigned i = 0; i < n; ++i) {
      if (g.threads[i].state == State::kAtBlockBarrier) g.threads[i].state = State::kRunnable;
    }
  }
}

}  // namespace

int sm_count() {
  const char* env = std::getenv("FASTCL_EMU_SMS");
  const int n = env != nullptr ? std::atoi(env) : 132;
  return n > 0 ? n : 132;
}

std::string last_error_message() { return g_last_message; }

void record_launch_error(cudaError_t e) {
  if (e != cudaSuccess && g_last_error == cudaSuccess) g_last_error = e;
}

void config_error(const std::string& msg) {
  g_last_message = msg;
  record_launch_error(cudaErrorInvalidConfiguration);
}

cudaError_t run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  if (n == 0 || n > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64) {
    config_error("a block of (" + std::to_string(block.x) + ", " + std::to_string(block.y) +
                 ", " + std::to_string(block.z) + ") threads");
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    config_error("a grid of (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                 std::to_string(grid.z) + ") blocks");
    return cudaErrorInvalidConfiguration;
  }
  Grid& g = grid_state();
  if (g.body != nullptr) {
    config_error("a launch from inside a kernel");
    return cudaErrorInvalidConfiguration;
  }
  while (g.stacks.size() < n) g.stacks.emplace_back(new char[kStackBytes]);
  g.threads.resize(n);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) g.threads[i].idx = uint3{x, y, z};
  g.body = &body;
  g.error.clear();
  blockDim = block;
  gridDim = grid;
  bool ok = true;
  for (unsigned bz = 0; ok && bz < grid.z; ++bz)
    for (unsigned by = 0; ok && by < grid.y; ++by)
      for (unsigned bx = 0; ok && bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        ok = run_block(g, static_cast<unsigned>(n));
      }
  g.body = nullptr;
  g.current = -1;
  if (!ok) {
    g_last_message = g.error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

void fail(const std::string& msg) {
  Grid& g = grid_state();
  g.error = msg + " in " + where(g.threads[g.current]);
  yield(State::kFailed);
  std::abort();  // a failed thread is never resumed
}

void syncthreads() { yield(State::kAtBlockBarrier); }

// Exchanges alternate between two slots: a lane that has read the value of exchange k can
// publish that of k + 1 while others still read k's, and none can publish k + 2 before every lane
// has published k + 1, that is, has read k's.
uint64_t exchange(uint64_t mine, int src_lane) {
  Grid& g = grid_state();
  const unsigned me = static_cast<unsigned>(g.current);
  const unsigned src = (me & ~31u) + static_cast<unsigned>(src_lane);
  if (src >= g.threads.size()) fail("a shuffle from lane " + std::to_string(src_lane) +
                                    " beyond the block's threads");
  Thread& t = g.threads[me];
  const unsigned parity = t.exchanges++ & 1u;
  t.slot[parity] = mine;
  yield(State::kAtWarpBarrier);  // every lane has published
  return g.threads[src].slot[parity];
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string s;
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: s = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: s = "invalid configuration argument"; break;
    case cudaErrorLaunchFailure: s = "unspecified launch failure"; break;
  }
  s += " (emulation: " + emu::g_last_message + ")";
  return s.c_str();
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::sm_count();
  return cudaSuccess;
}
