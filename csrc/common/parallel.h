// parallel_for over [0, n) on a persistent pool. The thread count is passed in by every call
// (Python reads torch.get_num_threads()), so hotops never oversubscribes beside torch's own pool.
#pragma once
#include <cstdint>

namespace hotops {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Splits [0, n) into at most `threads` contiguous chunks of at least `grain` items and runs
// fn(ctx, begin, end) on each; returns when all are done. The first exception thrown by any
// chunk is rethrown in the caller. Nested calls run inline.
void parallel_for_raw(int64_t n, int64_t grain, int threads, RangeFn fn, void* ctx);

// Splits [0, n) into pieces of `grain` items (the last one shorter) that up to `threads` threads
// claim one at a time, so a thread slowed by the OS or by another pool costs at most one piece.
// For work whose per-call setup is cheap; parallel_for keeps the call count at `threads`.
void parallel_for_dynamic_raw(int64_t n, int64_t grain, int threads, RangeFn fn, void* ctx);

// Type-safe front end. Kernel translation units are compiled per ISA, so the template is
// instantiated per lambda type there and the pool itself stays in one baseline-compiled TU.
template <typename F>
void parallel_for(int64_t n, int64_t grain, int threads, const F& f) {
  parallel_for_raw(
      n, grain, threads,
      [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<F*>(&f));
}

template <typename F>
void parallel_for_dynamic(int64_t n, int64_t grain, int threads, const F& f) {
  parallel_for_dynamic_raw(
      n, grain, threads,
      [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<F*>(&f));
}

}  // namespace hotops
