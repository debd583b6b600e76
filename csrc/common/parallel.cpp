#include "common/parallel.h"

#include <dlfcn.h>
#include <pthread.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace hotops {
namespace {

thread_local bool in_parallel_region = false;

// parallel_for cuts [0, n) into up to this many chunks per thread (none below `grain` items),
// claimed from one counter: when another process holds up one of the threads, the others take
// its share of the chunks not yet started instead of waiting for it.
constexpr int64_t kChunksPerThread = 4;

// GOMP_parallel of the OpenMP runtime torch uses, when Python found one (set_openmp_parallel), and
// the same runtime's omp_get_num_threads (the team size a region really got).
using OmpParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpNumThreads = int (*)();
std::atomic<OmpParallel> omp_parallel{nullptr};
std::atomic<OmpNumThreads> omp_num_threads{nullptr};

// A whole number from the environment in [0, most], else `fallback`: unset or empty silently,
// anything else (text, a fraction, out of range) with a line on stderr saying what was used.
int64_t env_count(const char* name, int64_t fallback, int64_t most) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v, &end, 10);
  if (errno == 0 && *end == '\0' && n >= 0 && n <= most) return n;
  std::fprintf(stderr, "hotops: %s=%s is not a whole number from 0 to %lld; using %lld\n", name, v,
               static_cast<long long>(most), static_cast<long long>(fallback));
  return fallback;
}

// How long a thread that has run out of chunks spins before it sleeps (HOTOPS_SPIN_US, default
// 50 us). A sleeping thread leaves its core idle, so the kernel moves a teammate that another
// process preempted onto it at once; a spinning one keeps the core, and the teammate waits for the
// other process's time slice (milliseconds), as in the OpenMP runtime's own join barrier, whose
// default policy spins for about that long. Read at load, so that a bad value says so at import.
const int64_t kSpinNs = env_count("HOTOPS_SPIN_US", 50, 1000000) * 1000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Sleep while *word == value (or return at once), and wake every such sleeper: a futex on Linux;
// elsewhere the waiter yields its core in a loop.
inline void futex_wait(std::atomic<int32_t>* word, int32_t value) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<int32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
#else
  (void)word;
  (void)value;
  std::this_thread::yield();
#endif
}

inline void futex_wake_all(std::atomic<int32_t>* word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<int32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// A counter that threads add to and wait on until it reaches a target: spin (kSpinNs), then sleep
// on a futex; add() wakes the sleepers when it reaches the target.
struct Gate {
  std::atomic<int32_t> count{0};
  std::atomic<int32_t> sleepers{0};

  void add(int32_t k, int32_t target) {
    if (count.fetch_add(k) + k == target && sleepers.load() > 0) futex_wake_all(&count);
  }

  void wait(int32_t target) {
    if (count.load(std::memory_order_acquire) == target) return;
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNs);
    for (int i = 1;; ++i) {
      if (count.load(std::memory_order_acquire) == target) return;
      cpu_relax();
      if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) break;
    }
    sleepers.fetch_add(1);
    for (int32_t c; (c = count.load()) != target;) futex_wait(&count, c);
    sleepers.fetch_sub(1);
  }
};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The calling thread's involuntary context switches so far (preempted by another runnable thread).
long preemptions() {
#if defined(__linux__) && defined(RUSAGE_THREAD)
  rusage u;
  return getrusage(RUSAGE_THREAD, &u) == 0 ? u.ru_nivcsw : 0;
#else
  return 0;
#endif
}

// Another process competing for the cores. Every thread of an OpenMP region must reach its join
// before the call returns, so a teammate that is preempted, or woken late (it waits for the other
// process's time slice), holds the whole call: milliseconds for a sub-millisecond kernel. The own
// pool waits only for the chunks in progress. So when a region on torch's team saw a teammate
// arrive more than 200 us after the start, or a thread preempted while it ran, the calls of the
// next HOTOPS_CONTENDED_MS milliseconds (default 100; 0: never) run on the own pool, then the team
// is tried again. Quiet, the team stays (no torch worker spinning beside hotops' own threads).
constexpr int64_t kLateNs = 200000;
const int64_t kContendedNs = env_count("HOTOPS_CONTENDED_MS", 100, 3600000) * 1000000;
std::atomic<int64_t> pool_until_ns{0};

// A job on torch's OpenMP team: every team thread claims chunks until none is left, then waits in
// a Gate (not in the runtime's spinning barrier) until every chunk is done and every team thread
// has arrived, so that the runtime's join at the end finds everyone there.
struct OmpJob {
  RangeFn fn;
  void* ctx;
  int64_t n, chunks;
  int64_t next = 0;
  Gate gate;
  std::mutex m;
  std::exception_ptr error;
  int64_t start_ns = now_ns();
  std::atomic<bool> contended{false};

  static void body(void* p) {
    OmpJob& job = *static_cast<OmpJob*>(p);
    const long preempted = preemptions();
    if (now_ns() - job.start_ns > kLateNs) job.contended.store(true, std::memory_order_relaxed);
    const OmpNumThreads team = omp_num_threads.load(std::memory_order_relaxed);
    // the gate counts chunks done, plus one per thread when the team size is known
    const int32_t target = static_cast<int32_t>(job.chunks) + (team ? team() : 0);
    int32_t done = team ? 1 : 0;
    in_parallel_region = true;
    for (int64_t c; (c = __atomic_fetch_add(&job.next, int64_t(1), __ATOMIC_RELAXED)) < job.chunks; ++done) {
      try {
        job.fn(job.ctx, job.n * c / job.chunks, job.n * (c + 1) / job.chunks);
      } catch (...) {  // an exception must not unwind through the OpenMP runtime
        std::lock_guard<std::mutex> lk(job.m);
        if (!job.error) job.error = std::current_exception();
      }
    }
    in_parallel_region = false;
    if (preemptions() != preempted) job.contended.store(true, std::memory_order_relaxed);
    if (done) job.gate.add(done, target);
    job.gate.wait(target);
  }
};

// One job at a time (callers are serialised by job_mutex_). The caller and the workers all claim
// chunks from one counter until none is left, so a thread that starts late or runs slowly (woken
// late, or sharing its core with one of torch's OpenMP workers still spinning after a torch op)
// holds up the job by at most the chunk it is running.
class Pool {
 public:
  static Pool& get() { return *current; }

  // In a process forked from one that used the pool, its workers do not exist, its condition
  // variables still count them as waiters (a notify would wait for them forever) and its mutexes
  // may be held: the child starts a new pool and leaves the old one as it is.
  static void after_fork_in_child() { current = new Pool(); }

  // Chunk c of `chunks` covers [n*c/chunks, n*(c+1)/chunks); `team` threads (the caller and
  // team - 1 workers) claim them.
  void run(int64_t team, int64_t chunks, RangeFn fn, void* ctx, int64_t n) {
    std::lock_guard<std::mutex> job(job_mutex_);
    ensure_workers(static_cast<int>(team) - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      chunks_ = chunks;
      next_ = 0;
      pending_ = chunks;
      seats_ = team - 1;
      ++job_id_;
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

  // A worker takes one of the job's seats (at most `team` threads in all, however many workers
  // earlier jobs started), then claims chunks of that job until none is left.
  void loop() {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return next_ < chunks_ && seats_ > 0; });
      --seats_;
      for (const uint64_t job = job_id_; job == job_id_ && next_ < chunks_;) {
        const int64_t c = next_++;
        lk.unlock();
        run_chunk(c);
        lk.lock();
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::mutex job_mutex_, m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, chunks_ = 0, next_ = 0, pending_ = 0, seats_ = 0;
  uint64_t job_id_ = 0;
  std::exception_ptr error_;

  static Pool* current;  // never destroyed: workers may outlive static destructors
};
Pool* Pool::current = new Pool();

// A forked child cannot enter torch's OpenMP team either (libgomp keeps the parent's threads in
// it, which the child does not have): its parallel calls run on its own new pool.
std::atomic<bool> forked_child{false};
const int fork_handler = pthread_atfork(nullptr, nullptr, [] {
  Pool::after_fork_in_child();
  forked_child.store(true, std::memory_order_relaxed);
});

}  // namespace

void parallel_for_raw(int64_t n, int64_t grain, int threads, RangeFn fn, void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  threads = std::max(threads, 1);
  const int64_t chunks = std::min<int64_t>(kChunksPerThread * threads, (n + grain - 1) / grain);
  if (chunks <= 1 || threads == 1 || in_parallel_region) {
    fn(ctx, 0, n);
    return;
  }
  const int64_t team = std::min<int64_t>(threads, chunks);
  OmpParallel omp = omp_parallel.load(std::memory_order_acquire);
  if (omp && !forked_child.load(std::memory_order_relaxed) &&
      now_ns() >= pool_until_ns.load(std::memory_order_relaxed)) {
    OmpJob job{fn, ctx, n, chunks};
    omp(&OmpJob::body, &job, static_cast<unsigned>(team), 0);
    if (job.contended.load(std::memory_order_relaxed))
      pool_until_ns.store(now_ns() + kContendedNs, std::memory_order_relaxed);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  Pool::get().run(team, chunks, fn, ctx, n);
}

void set_openmp_parallel(void* gomp_parallel) {
  // omp_get_num_threads from the library that holds GOMP_parallel (every OpenMP runtime has both)
  OmpNumThreads team = nullptr;
  Dl_info info;
  if (gomp_parallel && dladdr(gomp_parallel, &info) && info.dli_fname)
    if (void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD))  // kept open, like torch keeps it
      team = reinterpret_cast<OmpNumThreads>(dlsym(lib, "omp_get_num_threads"));
  omp_num_threads.store(team, std::memory_order_relaxed);
  omp_parallel.store(reinterpret_cast<OmpParallel>(gomp_parallel), std::memory_order_release);
}

bool uses_openmp() { return omp_parallel.load(std::memory_order_acquire) != nullptr; }

}  // namespace hotops
