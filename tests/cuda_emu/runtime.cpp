// The CUDA emulator's runtime: launches, the fiber scheduler, barriers and warp intrinsics.
//
// A launch runs its blocks one after another (in the order of the schedule); inside a block every
// CUDA thread is a fiber on one OS thread, with stacks reused across blocks. A fiber runs until
// it reaches __syncthreads or a warp intrinsic, where it parks, or until it exits.
// After each sweep over the runnable fibers the scheduler releases the warp groups whose lanes
// have all arrived (computing the intrinsic's results as the hardware does) and then, once every
// live thread waits at the same __syncthreads, the whole block. A sweep that leaves nothing
// runnable and releases nothing is a deadlock: the launch stops with a cuda_emu::Error naming the
// kernel, the block and what every waiting thread waits for.
//
// The schedule is the order of each sweep (ascending, descending or a seeded shuffle of the
// thread ids, and of the blocks) and its mode: lockstep (every thread reaches its next
// synchronization point before any warp collective completes) or warp-eager (each warp runs as
// far as it can, through its own collectives, before the next warp starts). A missing
// __syncthreads/__syncwarp lets a reader run before or after the writer depending on it, so the
// answers of two schedules differ.
//
// With -fsanitize=address every switch is announced to ASan (__sanitizer_start/finish_switch_fiber)
// so that it tracks the fiber stacks; the dynamic shared memory of a launch is its own heap block
// of exactly the requested size, so an access past it is reported like any heap overflow.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_emu_control.h"
#include "cuda_runtime.h"

// The ThreadSanitizer build (racecheck stand-in) compiles this file without instrumentation, so
// the emulator's own bookkeeping is invisible to TSan, and tells TSan about fibers and
// synchronization: fibers switch without implying any ordering; __syncthreads and __syncwarp are
// release/acquire pairs on one object per block and per warp; a block's first switch into each
// thread orders the launch (host writes, earlier blocks) before it, and each exiting thread
// releases what the host acquires after the block. Warp shuffles, votes and matches imply no
// memory ordering, as on the GPU.
#if defined(CUDA_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#else
#define CUDA_EMU_ASAN 0
#endif

namespace cuda_emu {

const ThreadIndex* g_index = nullptr;

namespace {

constexpr int kMaxBlockThreads = 1024;
constexpr unsigned kMaxGridX = 2147483647u;
constexpr unsigned kMaxGridYZ = 65535u;
constexpr int kDefaultDynamicShared = 48 * 1024;
constexpr int kMaxDynamicShared = 227 * 1024;  // sm_90's opt-in limit (sm_80: 163 KiB)
constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kWatchdogSeconds = 120;

enum class State { kRunnable, kBarrier, kWarp, kExited };

struct Waiting {  // what a parked fiber waits at
  WarpOp op;
  unsigned mask;
  uint64_t value;
  int bytes, arg, width;
  const char* file;
  int line;
};

struct Stack {
  unsigned char* base;  // guard page first, then kStackBytes
  unsigned char* bottom() const { return base + getpagesize(); }
};

// ---- execution contexts
//
// On x86-64 a switch saves the callee-saved registers and the SSE/x87 control words on the old
// stack and swaps stack pointers (System V ABI: everything else is caller-saved), which avoids
// the signal-mask system call swapcontext makes on every switch. Elsewhere: ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp;
};

extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
  .popsection
)");

void switch_context(Context& save, Context& load) { cuda_emu_switch(&save.sp, load.sp); }

// A fresh context whose first switch "returns" into entry with the stack aligned as after a call.
void make_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  top[-1] = 0;                                     // entry's return address: it never returns
  top[-2] = reinterpret_cast<uint64_t>(entry);     // popped by `ret`
  for (int r = 3; r <= 8; ++r) top[-r] = 0;        // rbp, rbx, r12..r15
  top[-9] = 0x1f80ull | (uint64_t(0x037f) << 32);  // default MXCSR and x87 control word
  c.sp = top - 9;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }

void make_context(Context& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Thread {
  ThreadIndex index;
  int linear;
  State state;
  Waiting wait;
  uint64_t result;
  Context context;
  Stack stack;
  void* fake_stack;
  void* tsan_fiber;  // CUDA_EMU_TSAN: the TSan fiber of this thread slot
  bool tsan_fresh;   // CUDA_EMU_TSAN: not yet switched to in this block
};

struct Launch {
  const char* name = nullptr;
  const char* signature = nullptr;
  LaunchConfig config{};
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  unsigned char* dynamic_shared = nullptr;
  uint3 block{};
};

enum class Order { kAscending, kDescending, kShuffled };
Order g_order = Order::kAscending;
bool g_eager = false;
uint64_t g_seed = 0;
cudaStream_t g_stream = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dynamic_shared;
Counters g_counters{};

Launch g_launch;
std::vector<Thread> g_threads;
std::vector<Stack> g_stacks;
Thread* g_current = nullptr;
Context g_scheduler;
std::string g_fiber_error;  // set by a fiber that stops the launch (then it never resumes)
uint64_t g_block_serial = 0;                         // counts blocks over all launches
std::unordered_map<void*, uint64_t> g_shared_block;  // static shared variable -> block that filled it

#if defined(CUDA_EMU_TSAN)
std::vector<void*> g_tsan_fibers;  // one per thread slot, reused across blocks
void* g_tsan_scheduler = nullptr;
char g_tsan_block_end, g_tsan_barrier, g_tsan_warp[32];  // synchronization objects
constexpr unsigned kTsanNoSync = 1;                      // __tsan_switch_to_fiber_no_sync
#endif

#if CUDA_EMU_ASAN
void* g_scheduler_fake_stack = nullptr;
const void* g_scheduler_stack_bottom = nullptr;
size_t g_scheduler_stack_size = 0;
#endif

std::string where(const Thread& t) {
  std::ostringstream s;
  s << "thread (" << t.index.thread_idx.x << "," << t.index.thread_idx.y << "," << t.index.thread_idx.z << ") [warp "
    << t.linear / 32 << " lane " << t.linear % 32 << "]";
  return s.str();
}

std::string launch_name() {
  std::ostringstream s;
  s << "kernel " << g_launch.name << " block (" << g_launch.block.x << "," << g_launch.block.y << ","
    << g_launch.block.z << ") of grid (" << g_launch.config.grid.x << "," << g_launch.config.grid.y << ","
    << g_launch.config.grid.z << "), block dim (" << g_launch.config.block.x << "," << g_launch.config.block.y
    << "," << g_launch.config.block.z << ")";
  return s.str();
}

[[noreturn]] void fail(const std::string& what) {
  throw Error("cuda_emu: " + launch_name() + ": " + what + "\n  (launched as " + g_launch.signature + ")");
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
  }
  return "?";
}

std::string describe_wait(const Thread& t) {
  std::ostringstream s;
  switch (t.state) {
    case State::kRunnable: s << "runnable"; break;
    case State::kExited: s << "exited"; break;
    case State::kBarrier: s << "at __syncthreads " << t.wait.file << ":" << t.wait.line; break;
    case State::kWarp:
      s << "at " << op_name(t.wait.op) << "(mask 0x" << std::hex << t.wait.mask << std::dec << ") " << t.wait.file
        << ":" << t.wait.line;
      break;
  }
  return s.str();
}

// ---- fiber switching

Stack new_stack() {
  const size_t page = getpagesize();
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw Error("cuda_emu: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);  // overflowing a fiber stack faults instead of corrupting memory
  return Stack{static_cast<unsigned char*>(p)};
}

void fiber_main();

// Fiber side: back to the scheduler; `exiting` tells ASan this fiber's fake stack can go.
void yield_to_scheduler(bool exiting) {
  Thread* t = g_current;
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t->fake_stack, g_scheduler_stack_bottom,
                                 g_scheduler_stack_size);
#else
  (void)exiting;
#endif
#if defined(CUDA_EMU_TSAN)
  if (exiting) __tsan_release(&g_tsan_block_end);
  __tsan_switch_to_fiber(g_tsan_scheduler, kTsanNoSync);
#endif
  switch_context(t->context, g_scheduler);
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
#endif
  g_launch.body(g_launch.context);
  g_current->state = State::kExited;
  yield_to_scheduler(true);
  std::abort();  // an exited fiber is never resumed
}

// Scheduler side: run t until it parks or exits.
void resume(Thread& t) {
  g_current = &t;
  g_index = &t.index;
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, t.stack.bottom(), kStackBytes);
#endif
#if defined(CUDA_EMU_TSAN)
  g_tsan_scheduler = __tsan_get_current_fiber();
  __tsan_switch_to_fiber(t.tsan_fiber, t.tsan_fresh ? 0 : kTsanNoSync);
  t.tsan_fresh = false;
#endif
  switch_context(g_scheduler, t.context);
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr);
#endif
  g_current = nullptr;
  g_index = nullptr;
  if (!g_fiber_error.empty()) {
    const std::string what = g_fiber_error;
    g_fiber_error.clear();
    fail(where(t) + ": " + what);
  }
}

void start_fiber(Thread& t) {
#if CUDA_EMU_ASAN
  // A reused stack may still carry the redzones of an abandoned fiber's frames.
  __asan_unpoison_memory_region(t.stack.bottom(), kStackBytes);
#endif
  t.fake_stack = nullptr;
#if defined(CUDA_EMU_TSAN)
  while (g_tsan_fibers.size() <= static_cast<size_t>(t.linear)) g_tsan_fibers.push_back(__tsan_create_fiber(0));
  t.tsan_fiber = g_tsan_fibers[t.linear];
  t.tsan_fresh = true;
  // TSan reports name their threads by this (it copies the string).
  const std::string name = "cuda_emu " + std::string(g_launch.name) + " block (" + std::to_string(g_launch.block.x) +
                           "," + std::to_string(g_launch.block.y) + "," + std::to_string(g_launch.block.z) + ") " +
                           where(t);
  __tsan_set_fiber_name(t.tsan_fiber, name.c_str());
#endif
  make_context(t.context, t.stack.bottom(), kStackBytes, fiber_main);
}

// ---- releasing parked threads

bool same_wait(const Waiting& a, const Waiting& b) {
  return a.op == b.op && a.mask == b.mask && a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

int source_lane(const Waiting& w, int lane) {
  const int width = w.width;
  const int segment = lane & ~(width - 1), position = lane & (width - 1);
  switch (w.op) {
    case WarpOp::kShfl: return segment + (w.arg & (width - 1));
    case WarpOp::kShflUp: return position - w.arg >= 0 ? lane - w.arg : lane;
    case WarpOp::kShflDown: return position + w.arg < width ? lane + w.arg : lane;
    case WarpOp::kShflXor: {
      const int src = lane ^ (w.arg & 31);
      return src >= segment + width ? lane : src;  // later segments are out of reach
    }
    default: return lane;
  }
}

// Computes and hands out the results of warp `first`'s group once all its lanes are there.
bool try_release_group(Thread& first) {
  const int warp = first.linear / 32;
  const unsigned mask = first.wait.mask;
  const int lane_count = std::min<int>(32, static_cast<int>(g_threads.size()) - warp * 32);
  if (!(mask >> (first.linear % 32) & 1u)) {
    fail(where(first) + " calls " + op_name(first.wait.op) + " with a mask that does not name its own lane");
  }
  Thread* lanes[32] = {};
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    if (lane >= lane_count) {
      fail(where(first) + " " + describe_wait(first) + " names lane " + std::to_string(lane) +
           ", which does not exist in this block: it would wait forever");
    }
    Thread& t = g_threads[warp * 32 + lane];
    if (t.state == State::kExited) {
      fail(where(first) + " " + describe_wait(first) + " names lane " + std::to_string(lane) +
           ", which has exited: it would wait forever (undefined behaviour)");
    }
    if (t.state != State::kWarp || !same_wait(t.wait, first.wait)) return false;
    lanes[lane] = &t;
  }
  const Waiting& w = first.wait;
  if (w.op == WarpOp::kShfl || w.op == WarpOp::kShflUp || w.op == WarpOp::kShflDown || w.op == WarpOp::kShflXor) {
    if (w.width < 1 || w.width > 32 || (w.width & (w.width - 1)) != 0) {
      fail(where(first) + " " + describe_wait(first) + " uses width " + std::to_string(w.width) +
           "; it must be a power of two <= 32");
    }
  }
  unsigned votes = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (lanes[lane] != nullptr && lanes[lane]->wait.value != 0) votes |= 1u << lane;
  }
  for (int lane = 0; lane < 32; ++lane) {
    Thread* t = lanes[lane];
    if (t == nullptr) continue;
    uint64_t result = 0;
    switch (w.op) {
      case WarpOp::kSyncwarp: break;
      case WarpOp::kBallot: result = votes; break;
      case WarpOp::kAny: result = votes != 0; break;
      case WarpOp::kAll: result = votes == mask; break;
      case WarpOp::kMatchAny:
        for (int other = 0; other < 32; ++other) {
          if (lanes[other] != nullptr && lanes[other]->wait.value == t->wait.value) result |= 1u << other;
        }
        break;
      default: {
        const int src = source_lane(t->wait, lane);
        if (lanes[src] == nullptr) {
          fail(where(*t) + " " + describe_wait(*t) + " reads lane " + std::to_string(src) +
               ", which is not in the mask (undefined value on the hardware)");
        }
        result = lanes[src]->wait.value;
      }
    }
    t->result = result;
    t->state = State::kRunnable;
  }
  ++g_counters.warp_collectives;
  return true;
}

bool try_release_warps() {
  bool released = false;
  for (Thread& t : g_threads) {
    if (t.state == State::kWarp && try_release_group(t)) released = true;
  }
  return released;
}

bool try_release_barrier() {
  const Thread* first = nullptr;
  for (const Thread& t : g_threads) {
    if (t.state == State::kExited) continue;
    if (t.state != State::kBarrier) return false;
    if (first == nullptr) {
      first = &t;
    } else if (t.wait.line != first->wait.line || std::strcmp(t.wait.file, first->wait.file) != 0) {
      fail("divergent __syncthreads: " + where(*first) + " waits " + describe_wait(*first) + " but " + where(t) +
           " waits " + describe_wait(t));
    }
  }
  if (first == nullptr) return false;
  for (Thread& t : g_threads) {
    if (t.state == State::kBarrier) t.state = State::kRunnable;
  }
  ++g_counters.barriers;
  return true;
}

[[noreturn]] void deadlock() {
  std::ostringstream s;
  s << "deadlock, no thread can make progress:";
  int shown = 0;
  for (const Thread& t : g_threads) {
    if (t.state == State::kExited) continue;
    if (shown++ == 8) {
      s << " ...";
      break;
    }
    s << "\n  " << where(t) << " " << describe_wait(t);
  }
  fail(s.str());
}

// ---- one block

std::vector<int> in_order(std::vector<int> ids, std::mt19937_64& rng) {
  if (g_order == Order::kDescending) std::reverse(ids.begin(), ids.end());
  if (g_order == Order::kShuffled) std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

std::vector<int> range(int begin, int end) {
  std::vector<int> ids;
  for (int i = begin; i < end; ++i) ids.push_back(i);
  return ids;
}

// Lockstep: every runnable thread of the block runs to its next synchronization point before any
// warp collective completes, so warps advance together.
bool lockstep_sweep(std::mt19937_64& rng) {
  bool ran = false;
  for (int i : in_order(range(0, static_cast<int>(g_threads.size())), rng)) {
    if (g_threads[i].state != State::kRunnable) continue;
    resume(g_threads[i]);
    ran = true;
  }
  return ran;
}

// Warp-eager: one warp at a time runs as far as it can, its own collectives completing at once,
// before the next warp starts: maximal skew between warps, which exposes a missing __syncthreads
// between one warp's reads of shared memory and another warp's next writes.
bool eager_sweep(std::mt19937_64& rng) {
  bool ran = false;
  const int count = static_cast<int>(g_threads.size());
  for (int warp : in_order(range(0, (count + 31) / 32), rng)) {
    const std::vector<int> lanes = range(warp * 32, std::min(count, warp * 32 + 32));
    for (bool again = true; again;) {
      for (int i : in_order(lanes, rng)) {
        if (g_threads[i].state != State::kRunnable) continue;
        resume(g_threads[i]);
        ran = true;
      }
      again = false;
      for (int i : lanes) {
        if (g_threads[i].state == State::kWarp && try_release_group(g_threads[i])) again = true;
      }
    }
  }
  return ran;
}

void run_block(uint3 block, std::mt19937_64& rng) {
  const dim3 bd = g_launch.config.block;
  const int count = static_cast<int>(bd.x * bd.y * bd.z);
  g_launch.block = block;
  ++g_block_serial;
  while (static_cast<int>(g_stacks.size()) < count) g_stacks.push_back(new_stack());
  g_threads.assign(count, Thread{});
  for (int i = 0; i < count; ++i) {
    Thread& t = g_threads[i];
    t.linear = i;
    t.index = ThreadIndex{uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)}, block, bd, g_launch.config.grid};
    t.state = State::kRunnable;
    t.stack = g_stacks[i];
    start_fiber(t);
  }
  if (g_launch.dynamic_shared != nullptr) {
    std::memset(g_launch.dynamic_shared, 0xa5, g_launch.config.shared_bytes);  // uninitialized on the GPU
  }
  for (;;) {
    const bool ran = g_eager ? eager_sweep(rng) : lockstep_sweep(rng);
    const bool released = try_release_warps() || try_release_barrier();
    const bool all_exited =
        std::all_of(g_threads.begin(), g_threads.end(), [](const Thread& t) { return t.state == State::kExited; });
    if (all_exited) break;
    if (!ran && !released) deadlock();
  }
#if defined(CUDA_EMU_TSAN)
  __tsan_acquire(&g_tsan_block_end);
#endif
  g_counters.threads += count;
  ++g_counters.blocks;
}

cudaError_t check_config(const void* func, const LaunchConfig& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.block.x < 1 || c.block.y < 1 || c.block.z < 1 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 ||
      threads > kMaxBlockThreads) {
    return cudaErrorInvalidConfiguration;
  }
  if (c.grid.x < 1 || c.grid.y < 1 || c.grid.z < 1 || c.grid.x > kMaxGridX || c.grid.y > kMaxGridYZ ||
      c.grid.z > kMaxGridYZ) {
    return cudaErrorInvalidConfiguration;
  }
  const auto opt_in = g_max_dynamic_shared.find(func);
  const int limit = opt_in == g_max_dynamic_shared.end() ? kDefaultDynamicShared : opt_in->second;
  if (c.shared_bytes > static_cast<size_t>(std::max(limit, kDefaultDynamicShared))) return cudaErrorInvalidValue;
  return cudaSuccess;
}

void check_stream(cudaStream_t stream, const char* call) {
  if (stream != g_stream) {
    std::ostringstream s;
    s << "cuda_emu: " << call << " on stream " << static_cast<const void*>(stream)
      << ", not on the stream the launcher was given (" << static_cast<const void*>(g_stream) << ")";
    throw Error(s.str());
  }
}

#if CUDA_EMU_ASAN
// ASan's report names the kernel function; this adds the emulated block and thread.
void report_emulated_thread() {
  if (g_launch.name == nullptr || g_current == nullptr) return;
  std::fprintf(stderr, "cuda_emu: the access above was made by %s, %s\n", launch_name().c_str(),
               where(*g_current).c_str());
}

struct InstallDeathCallback {
  InstallDeathCallback() { __sanitizer_set_death_callback(report_emulated_thread); }
} g_install_death_callback;
#endif

void watchdog(int) {
  static const char message[] = "cuda_emu: watchdog: a launch ran for too long (a spin loop waiting for another "
                                "thread never yields in the emulator); aborting\n";
  (void)!write(2, message, sizeof message - 1);
  if (g_launch.name != nullptr) {
    (void)!write(2, g_launch.name, std::strlen(g_launch.name));
    (void)!write(2, "\n", 1);
  }
  std::abort();
}

}  // namespace

// ---- device side

void* dynamic_shared() { return g_launch.dynamic_shared; }

void fresh_shared(void* variable, size_t bytes) {
  uint64_t& filled = g_shared_block[variable];
  if (filled == g_block_serial) return;
  filled = g_block_serial;
  // Garbage, as uninitialized on the GPU; byte stores rather than memset, which TSan would see
  // as a write by whichever thread got here first.
  volatile unsigned char* bytes_of = static_cast<unsigned char*>(variable);
  for (size_t i = 0; i < bytes; ++i) bytes_of[i] = 0xa5;
}

void check_launch_bounds(int max_threads) {
  const dim3 bd = g_launch.config.block;
  if (static_cast<int64_t>(bd.x) * bd.y * bd.z > max_threads) {
    g_fiber_error = "the block has " + std::to_string(bd.x * bd.y * bd.z) + " threads, more than the kernel's " +
                    "__launch_bounds__(" + std::to_string(max_threads) + "): the launch fails on the hardware";
    yield_to_scheduler(false);
  }
}

void syncthreads(const char* file, int line) {
  Thread* t = g_current;
  t->state = State::kBarrier;
  t->wait = Waiting{WarpOp::kSyncwarp, 0, 0, 0, 0, 0, file, line};
#if defined(CUDA_EMU_TSAN)
  __tsan_release(&g_tsan_barrier);
#endif
  yield_to_scheduler(false);
#if defined(CUDA_EMU_TSAN)
  __tsan_acquire(&g_tsan_barrier);
#endif
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int bytes, int arg, int width, const char* file,
                         int line) {
  Thread* t = g_current;
  t->state = State::kWarp;
  t->wait = Waiting{op, mask, value, bytes, arg, width, file, line};
#if defined(CUDA_EMU_TSAN)
  if (op == WarpOp::kSyncwarp) __tsan_release(&g_tsan_warp[t->linear / 32]);
#endif
  yield_to_scheduler(false);
#if defined(CUDA_EMU_TSAN)
  if (op == WarpOp::kSyncwarp) __tsan_acquire(&g_tsan_warp[t->linear / 32]);
#endif
  return t->result;
}

// ---- host side

void run_grid(const char* name, const char* signature, const void* func, const LaunchConfig& config,
              void (*body)(void*), void* context) {
  check_stream(config.stream, name);
  const cudaError_t err = check_config(func, config);
  if (err != cudaSuccess) {
    g_last_error = err;
    return;
  }
  g_launch = Launch{name, signature, config, body, context, nullptr, uint3{}};
  if (config.shared_bytes > 0) g_launch.dynamic_shared = static_cast<unsigned char*>(std::malloc(config.shared_bytes));
  struct FreeShared {
    ~FreeShared() {
      std::free(g_launch.dynamic_shared);
      g_launch.dynamic_shared = nullptr;
      alarm(0);
    }
  } free_shared;
  signal(SIGALRM, watchdog);
  alarm(kWatchdogSeconds);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < config.grid.z; ++z)
    for (unsigned y = 0; y < config.grid.y; ++y)
      for (unsigned x = 0; x < config.grid.x; ++x) blocks.push_back(uint3{x, y, z});
  std::mt19937_64 rng(g_seed ^ (g_counters.launches * 0x9e3779b97f4a7c15ull));
  if (g_order == Order::kDescending) std::reverse(blocks.begin(), blocks.end());
  if (g_order == Order::kShuffled) std::shuffle(blocks.begin(), blocks.end(), rng);
  ++g_counters.launches;
  for (const uint3& b : blocks) run_block(b, rng);
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > kMaxDynamicShared) return cudaErrorInvalidValue;
  g_max_dynamic_shared[func] = value;
  return cudaSuccess;
}

void configure(Schedule schedule, uint64_t seed, cudaStream_t stream) {
  const int bits = static_cast<int>(schedule);
  g_order = static_cast<Order>(bits & 3);
  g_eager = (bits & static_cast<int>(Schedule::kWarpEager)) != 0;
  g_seed = seed;
  g_stream = stream;
}

cudaError_t unread_error() { return g_last_error; }

Counters counters() { return g_counters; }

}  // namespace cuda_emu

// ---- the runtime API

cudaError_t cudaGetLastError() {
  const cudaError_t err = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError() { return cuda_emu::g_last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t stream) {
  cuda_emu::check_stream(stream, "cudaMemsetAsync");
  if (count == 0) return cudaSuccess;
  if (dst == nullptr) return cudaErrorInvalidValue;
  std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
  cuda_emu::check_stream(stream, "cudaMemcpyAsync");
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  cuda_emu::check_stream(stream, "cudaStreamSynchronize");
  return cudaSuccess;
}
