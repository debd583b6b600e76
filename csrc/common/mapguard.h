// Memory-mapped files that survive being truncated under the mapping.
//
// Touching a page of a file mapping that lies past the file's current end raises SIGBUS, which
// kills the process. MappedFile maps a file copy-on-write and registers the mapped range with a
// process-wide SIGBUS handler (installed on first use, kept on top of handlers installed later,
// e.g. Python's faulthandler, by re-arming on every map and check). When a fault lies in a
// registered range, the handler maps an anonymous zero page over the faulting page and counts the
// fault; the faulting instruction then reads zeros. This works on any thread (OpenMP workers,
// NumPy code) since nothing unwinds. Faults outside the registered ranges go to the handler that
// was installed before (or the default action: the process dies, as it would have).
//
// Callers check `changed()` after reading the mapping: it reports faults, and a file whose size
// or modification time differs from when it was mapped, so results computed from zero pages (or
// from a file rewritten in place) are never handed out silently.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace hotops {

namespace mapguard {
// Installs the SIGBUS handler, or puts it back on top if another handler was installed since.
void arm();
// Registers [begin, begin + len) (page-aligned begin); returns a slot, or -1 when the table is full.
int add(const void* begin, size_t len);
void remove(int slot);
uint64_t faults(int slot);  // pages of this range replaced by zero pages so far
uint64_t total_faults();    // all ranges, ever (a cheap "anything damaged?" generation counter)
}  // namespace mapguard

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws hotops::Error (ValueError) or std::system_error
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  uint64_t faults() const;
  // Empty when the mapping still shows the file as it was mapped; else why not.
  std::string changed() const;
  // Drops the resident pages wholly inside [offset, offset + length): read again from the file
  // (or as zeros past its end) when next touched. A source read once through holds one chunk.
  void release(size_t offset, size_t length) const;

 private:
  std::string path_;
  int fd_ = -1;
  void* data_ = nullptr;
  size_t size_ = 0, mapped_ = 0;
  int64_t mtime_ns_ = 0;
  int slot_ = -1;
};

}  // namespace hotops
