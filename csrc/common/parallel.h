// parallel_for over [0, n) on a persistent pool. The thread count is passed in by every call
// (Python reads torch.get_num_threads()), so hotops never oversubscribes beside torch's own pool.
#pragma once
#include <cstdint>

namespace hotops {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Splits [0, n) into up to 4 * `threads` contiguous chunks of at least `grain` items and runs
// fn(ctx, begin, end) on each, on up to `threads` threads that claim chunks from one counter (a
// thread another process holds up takes fewer); returns when all are done. The first exception
// thrown by any chunk is rethrown in the caller. Nested calls run inline.
void parallel_for_raw(int64_t n, int64_t grain, int threads, RangeFn fn, void* ctx);

// Run parallel_for's chunks on the OpenMP team of the runtime torch uses (GOMP_parallel's address,
// found by Python) instead of hotops' own pool; nullptr goes back to the pool. Sharing torch's
// team means no second set of threads competes for the cores after a torch op (its OpenMP
// workers keep spinning for milliseconds, waiting for torch's next parallel region).
void set_openmp_parallel(void* gomp_parallel);
bool uses_openmp();

// Type-safe front end. Kernel translation units are compiled per ISA, so the template is
// instantiated per lambda type there and the pool itself stays in one baseline-compiled TU.
template <typename F>
void parallel_for(int64_t n, int64_t grain, int threads, const F& f) {
  parallel_for_raw(
      n, grain, threads, [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
      const_cast<F*>(&f));
}

// Runs work(claim) once on each of up to `threads` threads; claim() hands out the items 0, 1, ...,
// n - 1 (then values >= n) in the order the threads ask. A thread slowed by something else on its
// core then takes fewer items instead of holding up the call, while per-thread setup (scratch
// buffers) still happens once per thread:
//   parallel_claim(n, threads, [&](auto claim) { Scratch s; for (int64_t i; (i = claim()) < n;) ... });
template <typename F>
void parallel_claim(int64_t n, int threads, const F& work) {
  int64_t next = 0;
  const auto claim = [&next] { return __atomic_fetch_add(&next, int64_t(1), __ATOMIC_RELAXED); };
  parallel_for(n < threads ? n : threads, 1, threads, [&](int64_t, int64_t) { work(claim); });
}

}  // namespace hotops
