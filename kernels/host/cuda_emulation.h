/*
 * Runs the CUDA kernels (kernels/NAME.cu) on the host, for tests on machines
 * without a GPU: each .cu file is compiled as C++ with this header forced
 * in front (g++ -include), into a shared library the Rust tests load.
 *
 * Every block runs on its own, one after another; its threads are fibers
 * (ucontext) on one OS thread, switched at __syncthreads and at warp
 * collectives, so barriers, shuffles, ballots and shared memory behave as on
 * the device. Blocks run in index order, so the last-block reductions see
 * every earlier partial, as they must on a GPU. A barrier that could never
 * complete (divergent __syncthreads) aborts with a message.
 *
 * What it does not model: concurrency between blocks (races are invisible),
 * memory-ordering subtleties, and the dtype behaviour of real tensor cores.
 */
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <ucontext.h>

#define PL_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
/* One block runs at a time, so a function-local static is that block's shared memory. */
#define __shared__ static

struct dim3 {
    unsigned int x, y, z;
};
struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned int x, y, z, w;
};

namespace pl_emu {

enum State { RUN, AT_SYNCTHREADS, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;
    State state;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<char> stacks;
    std::vector<uint64_t> slots;  // one per thread, for warp collectives
    ucontext_t scheduler;
    unsigned int current = 0;
    void (*entry)(void *) = nullptr;
    void *ctx = nullptr;
};

inline Block *g_block = nullptr;
inline dim3 g_block_idx, g_grid_dim, g_block_dim, g_thread_idx;

inline void wait(State why) {
    Fiber &f = g_block->fibers[g_block->current];
    f.state = why;
    swapcontext(&f.ctx, &g_block->scheduler);
}

inline void fiber_main() {
    g_block->entry(g_block->ctx);
    g_block->fibers[g_block->current].state = DONE;  // uc_link returns to the scheduler
}

/* Releases the threads of a barrier every live participant has reached;
 * false when none can be released (a deadlock on a real device too). */
inline bool release(Block &b) {
    unsigned int n = b.fibers.size(), live = 0, synced = 0;
    for (auto &f : b.fibers) {
        live += f.state != DONE;
        synced += f.state == AT_SYNCTHREADS;
    }
    if (live > 0 && synced == live) {
        for (auto &f : b.fibers) f.state = f.state == DONE ? DONE : RUN;
        return true;
    }
    bool any = false;
    for (unsigned int w = 0; w < n; w += 32) {
        unsigned int lanes = 0, waiting = 0;
        for (unsigned int t = w; t < w + 32 && t < n; ++t) {
            lanes += b.fibers[t].state != DONE;
            waiting += b.fibers[t].state == AT_WARP;
        }
        if (waiting > 0 && waiting == lanes) {
            for (unsigned int t = w; t < w + 32 && t < n; ++t)
                if (b.fibers[t].state == AT_WARP) b.fibers[t].state = RUN;
            any = true;
        }
    }
    return any;
}

inline void run_block(Block &b, unsigned int threads) {
    constexpr size_t kStack = 64 * 1024;
    b.fibers.assign(threads, Fiber{});
    b.stacks.resize(threads * kStack);
    b.slots.assign(threads, 0);
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber &f = b.fibers[t];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = b.stacks.data() + t * kStack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
        f.state = RUN;
    }
    for (;;) {
        for (unsigned int t = 0; t < threads; ++t) {
            if (b.fibers[t].state != RUN) continue;
            b.current = t;
            g_thread_idx = dim3{t, 0, 0};
            swapcontext(&b.scheduler, &b.fibers[t].ctx);
        }
        bool all_done = true;
        for (auto &f : b.fibers) all_done &= f.state == DONE;
        if (all_done) return;
        if (!release(b)) {
            std::fprintf(stderr, "cuda emulation: block (%u, %u) can never pass a barrier\n", g_block_idx.x,
                         g_block_idx.y);
            std::abort();
        }
    }
}

/* Exchanges one value per lane of the calling thread's warp. */
template <typename T> inline T exchange(T v, unsigned int src_lane) {
    Block &b = *g_block;
    unsigned int t = b.current, warp = t & ~31u;
    std::memcpy(&b.slots[t], &v, sizeof(T));
    wait(AT_WARP);  // every live lane has published
    T r = v;
    unsigned int src = warp + src_lane;
    if (src < b.fibers.size() && b.fibers[src].state != DONE) std::memcpy(&r, &b.slots[src], sizeof(T));
    wait(AT_WARP);  // every lane has read before the slots are reused
    return r;
}

}  // namespace pl_emu

#define threadIdx (::pl_emu::g_thread_idx)
#define blockIdx (::pl_emu::g_block_idx)
#define gridDim (::pl_emu::g_grid_dim)
#define blockDim (::pl_emu::g_block_dim)

inline void __syncthreads() { pl_emu::wait(pl_emu::AT_SYNCTHREADS); }
inline void __threadfence() {}
template <typename T> inline T __shfl_down_sync(unsigned int, T v, int offset) {
    unsigned int lane = pl_emu::g_block->current & 31u;
    return lane + offset < 32 ? pl_emu::exchange(v, lane + offset) : pl_emu::exchange(v, lane);
}
template <typename T> inline T __shfl_xor_sync(unsigned int, T v, int mask) {
    unsigned int lane = pl_emu::g_block->current & 31u;
    return pl_emu::exchange(v, lane ^ (unsigned int)mask);
}
inline unsigned int __ballot_sync(unsigned int, int predicate) {
    pl_emu::Block &b = *pl_emu::g_block;
    unsigned int t = b.current, warp = t & ~31u;
    b.slots[t] = predicate != 0;
    pl_emu::wait(pl_emu::AT_WARP);
    unsigned int word = 0;
    for (unsigned int l = 0; l < 32 && warp + l < b.fibers.size(); ++l)
        if (b.fibers[warp + l].state != pl_emu::DONE && b.slots[warp + l]) word |= 1u << l;
    pl_emu::wait(pl_emu::AT_WARP);
    return word;
}
inline unsigned int atomicAdd(unsigned int *p, unsigned int v) {
    unsigned int old = *p;
    *p = old + v;
    return old;
}
inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v) {
    unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}
template <typename T> inline T __ldcg(const T *p) { return *p; }
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

/* Runs `entry(ctx)` as every thread of a (grid_x, grid_y) grid of `threads`-thread blocks. */
extern "C" void pl_emu_launch(unsigned int grid_x, unsigned int grid_y, unsigned int threads,
                              void (*entry)(void *), void *ctx) {
    pl_emu::Block b;
    b.entry = entry;
    b.ctx = ctx;
    pl_emu::g_block = &b;
    pl_emu::g_grid_dim = dim3{grid_x, grid_y, 1};
    pl_emu::g_block_dim = dim3{threads, 1, 1};
    for (unsigned int y = 0; y < grid_y; ++y) {
        for (unsigned int x = 0; x < grid_x; ++x) {
            pl_emu::g_block_idx = dim3{x, y, 0};
            pl_emu::run_block(b, threads);
        }
    }
    pl_emu::g_block = nullptr;
}
