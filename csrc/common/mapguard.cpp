// See mapguard.h. The signal handler only reads atomics and calls mmap / sigaction / raise.
#include "common/mapguard.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <sstream>
#include <system_error>

#include "common/error.h"

namespace hotops {
namespace mapguard {
namespace {

constexpr int kSlots = 4096;

struct Slot {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<uint64_t> faults{0};
};

Slot g_slots[kSlots];
std::atomic<uint64_t> g_total{0};
std::atomic<int> g_chaining{0};
std::mutex g_mutex;  // add / remove / arm (never taken by the handler)
struct sigaction g_prev;
std::atomic<bool> g_have_prev{false};

uintptr_t page_size() {
  static const uintptr_t size = uintptr_t(sysconf(_SC_PAGESIZE));
  return size;
}

[[noreturn]] void die(int sig) {
  // The default action: for a hardware fault returning would fault again, for a raised signal
  // it would not, so raise it ourselves with the default disposition.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, nullptr);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  raise(sig);
  _exit(128 + sig);
}

void handler(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info ? info->si_addr : nullptr);
  if (info && info->si_code > 0) {  // a fault raised by the hardware, not kill() / raise()
    for (int i = 0; i < kSlots; ++i) {
      Slot& s = g_slots[i];
      const uintptr_t end = s.end.load(std::memory_order_acquire);
      if (!end) continue;
      const uintptr_t begin = s.begin.load(std::memory_order_acquire);
      if (addr < begin || addr >= end) continue;
      const uintptr_t page = addr & ~(page_size() - 1);
      void* got = mmap(reinterpret_cast<void*>(page), page_size(), PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (got == MAP_FAILED) break;
      s.faults.fetch_add(1, std::memory_order_relaxed);
      g_total.fetch_add(1, std::memory_order_release);
      errno = saved_errno;
      return;  // the faulting instruction runs again and reads zeros
    }
  }
  // Not ours: the previous handler's business. A handler that re-raises into us (faulthandler
  // restores its predecessor, which may be us, and raises) ends in the default action.
  if (g_chaining.exchange(1) || !g_have_prev.load()) die(sig);
  const struct sigaction prev = g_prev;
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction) prev.sa_sigaction(sig, info, context);
  } else if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
    die(sig);  // a fault cannot be ignored
  } else {
    prev.sa_handler(sig);
  }
  g_chaining.store(0);
  errno = saved_errno;
}

void arm_locked() {
  struct sigaction cur;
  if (sigaction(SIGBUS, nullptr, &cur) != 0) return;
  if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == handler) return;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  g_prev = cur;  // what to chain to for faults that are not ours
  g_have_prev.store(true);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

void arm() {
  std::lock_guard<std::mutex> lock(g_mutex);
  arm_locked();
}

int add(const void* begin, size_t len) {
  std::lock_guard<std::mutex> lock(g_mutex);
  arm_locked();
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin) & ~(page_size() - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(begin) + len + page_size() - 1) & ~(page_size() - 1);
  for (int i = 0; i < kSlots; ++i) {
    if (g_slots[i].end.load(std::memory_order_relaxed)) continue;
    g_slots[i].faults.store(0, std::memory_order_relaxed);
    g_slots[i].begin.store(b, std::memory_order_release);
    g_slots[i].end.store(e, std::memory_order_release);
    return i;
  }
  return -1;
}

void remove(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_slots[slot].end.store(0, std::memory_order_release);
  g_slots[slot].begin.store(0, std::memory_order_release);
}

uint64_t faults(int slot) {
  return slot < 0 || slot >= kSlots ? 0 : g_slots[slot].faults.load(std::memory_order_acquire);
}

uint64_t total_faults() { return g_total.load(std::memory_order_acquire); }

}  // namespace mapguard

namespace {
int64_t mtime_ns(const struct stat& st) {
  return int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}
}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), path);
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    throw std::system_error(err, std::generic_category(), path);
  }
  size_ = size_t(st.st_size);
  mtime_ns_ = mtime_ns(st);
  if (size_ == 0) return;
  // Private and writable: pages are read lazily and copied on write, never written back.
  data_ = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd_, 0);
  if (data_ == MAP_FAILED) {
    const int err = errno;
    data_ = nullptr;
    ::close(fd_);
    throw std::system_error(err, std::generic_category(), path);
  }
  mapped_ = size_;
  slot_ = mapguard::add(data_, mapped_);
  if (slot_ < 0) {
    munmap(data_, mapped_);
    ::close(fd_);
    fail(path, ": too many memory-mapped files are open (", 4096, "); load with mmap=False");
  }
}

MappedFile::~MappedFile() {
  if (slot_ >= 0) mapguard::remove(slot_);
  if (data_) munmap(data_, mapped_);
  if (fd_ >= 0) ::close(fd_);
}

uint64_t MappedFile::faults() const { return mapguard::faults(slot_); }

void MappedFile::release(size_t offset, size_t length) const {
  if (!data_ || length == 0 || offset >= mapped_) return;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t end = length > mapped_ - offset ? mapped_ : offset + length;  // no overflow
  const size_t lo = offset / page * page + (offset % page ? page : 0), hi = end / page * page;
  if (hi > lo) madvise(static_cast<char*>(data_) + lo, hi - lo, MADV_DONTNEED);
}

std::string MappedFile::changed() const {
  mapguard::arm();
  std::ostringstream why;
  if (const uint64_t n = faults()) {
    why << n << " page(s) of the mapping lay past the end of the file when read (the file was "
        << "truncated while mapped; those pages read as zeros)";
    return why.str();
  }
  struct stat st;
  if (fstat(fd_, &st) != 0) return std::string("fstat failed: ") + std::strerror(errno);
  if (size_t(st.st_size) != size_) {
    why << "the file is now " << st.st_size << " bytes; it was " << size_ << " when mapped";
    return why.str();
  }
  if (mtime_ns(st) != mtime_ns_) return "the file was written to since it was mapped";
  return "";
}

}  // namespace hotops
