// Host-side control of the CUDA emulator (tests/cuda_emu/runtime.cpp), for the test harness.
#pragma once
#include <cstdint>
#include <stdexcept>

#include "cuda_runtime_api.h"

namespace cuda_emu {

// What the hardware would turn into a hang, a fault or undefined behaviour (deadlock, divergent
// barrier, a shuffle reading an absent lane, a launch on the wrong stream): the launch stops and
// this propagates out of the launcher to the harness.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Order in which runnable fibers (and blocks) are resumed between synchronization points, plus
// kWarpEager: each warp runs ahead through its own warp collectives (see runtime.cpp).
enum class Schedule : int { kAscending = 0, kDescending = 1, kShuffled = 2, kWarpEager = 4 };

// Applies to the following launches. Every launch, memset, copy and synchronization must use
// `stream`, the one the launcher was handed.
void configure(Schedule schedule, uint64_t seed, cudaStream_t stream);

// The sticky "last error" the launcher did not read with cudaGetLastError; cudaSuccess if none.
cudaError_t unread_error();

struct Counters {
  uint64_t launches, blocks, threads, barriers, warp_collectives;
};
Counters counters();

}  // namespace cuda_emu
