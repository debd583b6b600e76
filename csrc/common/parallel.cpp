#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace hotops {
namespace {

thread_local bool in_parallel_region = false;

// GOMP_parallel of the OpenMP runtime torch uses, when Python found one (set_openmp_parallel).
using OmpParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
std::atomic<OmpParallel> omp_parallel{nullptr};

// A job on torch's OpenMP team: every team thread claims chunks until none is left.
struct OmpJob {
  RangeFn fn;
  void* ctx;
  int64_t n, chunks, next = 0;
  std::mutex m;
  std::exception_ptr error;

  static void body(void* p) {
    OmpJob& job = *static_cast<OmpJob*>(p);
    in_parallel_region = true;
    for (int64_t c; (c = __atomic_fetch_add(&job.next, int64_t(1), __ATOMIC_RELAXED)) < job.chunks;) {
      try {
        job.fn(job.ctx, job.n * c / job.chunks, job.n * (c + 1) / job.chunks);
      } catch (...) {  // an exception must not unwind through the OpenMP runtime
        std::lock_guard<std::mutex> lk(job.m);
        if (!job.error) job.error = std::current_exception();
      }
    }
    in_parallel_region = false;
  }
};

// One job at a time (callers are serialised by job_mutex_). The caller and the workers all claim
// chunks from one counter until none is left, so a thread that starts late or runs slowly (woken
// late, or sharing its core with one of torch's OpenMP workers still spinning after a torch op)
// holds up the job by at most the chunk it is running.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }

  // Chunk c of `chunks` covers [n*c/chunks, n*(c+1)/chunks).
  void run(int64_t chunks, RangeFn fn, void* ctx, int64_t n) {
    std::lock_guard<std::mutex> job(job_mutex_);
    ensure_workers(static_cast<int>(chunks) - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      chunks_ = chunks;
      next_ = 0;
      pending_ = chunks;
      error_ = nullptr;
    }
    cv_.notify_all();
    std::unique_lock<std::mutex> lk(m_);
    while (next_ < chunks_) {
      const int64_t c = next_++;
      lk.unlock();
      run_chunk(c);
      lk.lock();
      --pending_;
    }
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      workers_.emplace_back([this] { loop(); });
      workers_.back().detach();
    }
  }

  void run_chunk(int64_t c) {
    const int64_t begin = n_ * c / chunks_, end = n_ * (c + 1) / chunks_;
    in_parallel_region = true;
    try {
      fn_(ctx_, begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      if (!error_) error_ = std::current_exception();
    }
    in_parallel_region = false;
  }

  void loop() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return next_ < chunks_; });
      const int64_t c = next_++;
      lk.unlock();
      run_chunk(c);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex job_mutex_, m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, chunks_ = 0, next_ = 0, pending_ = 0;
  std::exception_ptr error_;
};

}  // namespace

void parallel_for_raw(int64_t n, int64_t grain, int threads, RangeFn fn, void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(std::max(threads, 1), (n + grain - 1) / grain);
  if (chunks <= 1 || in_parallel_region) {
    fn(ctx, 0, n);
    return;
  }
  if (OmpParallel omp = omp_parallel.load(std::memory_order_acquire)) {
    OmpJob job{fn, ctx, n, chunks};
    omp(&OmpJob::body, &job, static_cast<unsigned>(chunks), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  Pool::get().run(chunks, fn, ctx, n);
}

void set_openmp_parallel(void* gomp_parallel) {
  omp_parallel.store(reinterpret_cast<OmpParallel>(gomp_parallel), std::memory_order_release);
}

bool uses_openmp() { return omp_parallel.load(std::memory_order_acquire) != nullptr; }

}  // namespace hotops
