// A caching allocator for the large CPU tensors that moefast's kernels return.
//
// glibc serves a large allocation with mmap and gives it back with munmap when freed, so every
// training step pages its activations and gradients in afresh: the kernel zeroes each new 4 KiB
// page on first touch. On the 2-core VM the project measures on, filling a fresh 32 MB tensor took
// about 12 ms against 0.8 ms for one already paged in. This allocator keeps freed blocks of at
// least kMinBytes, by exact (rounded) size, and hands them to the next output of that size; in a
// training loop the shapes repeat from step to step, so after the first step the outputs come from
// the cache. Idle blocks are capped (MOEFAST_CPU_CACHE_MB, default 1024; 0 turns caching off), and
// moefast._C.cpu_cache_empty() frees them. Only kernel outputs use it (new_output in common.h);
// storages stay resizable, through this allocator.
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "common.h"

namespace moefast {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;  // smaller blocks: glibc's heap reuses them anyway
constexpr size_t kRound = size_t{1} << 16;

size_t cap_from_env() {
  const char* env = std::getenv("MOEFAST_CPU_CACHE_MB");
  if (env == nullptr || env[0] == '\0') return size_t{1024} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                    "moefast: MOEFAST_CPU_CACHE_MB must be a number of MiB >= 0, got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

void* alloc_block(size_t size) {
  void* p = nullptr;
  const int err = posix_memalign(&p, 64, size);  // c10's CPU alignment
  TORCH_CHECK(err == 0 && p != nullptr, "moefast: out of CPU memory allocating ", size, " bytes");
  return p;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator() : cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t size = (nbytes + kRound - 1) / kRound * kRound;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(size);
      if (it != idle_.end()) {
        block = it->second;
        idle_.erase(it);
        idle_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) block = new Block{alloc_block(size), size};
    return {block->ptr, block, &CachingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::multimap<size_t, Block*> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    for (auto& [size, block] : idle) {
      std::free(block->ptr);
      delete block;
    }
  }

  void set_cap(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      cap_ = bytes;
    }
    if (idle_bytes() > bytes) empty();
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  std::tuple<int64_t, int64_t, int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(cap_), hits_, misses_};
  }

 private:
  static void release(void* ctx);

  std::mutex mutex_;
  std::multimap<size_t, Block*> idle_;
  size_t idle_bytes_ = 0;
  size_t cap_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
CachingCpuAllocator& cache() {
  static auto* instance = new CachingCpuAllocator();
  return *instance;
}

void CachingCpuAllocator::release(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  CachingCpuAllocator& self = cache();
  {
    std::lock_guard<std::mutex> lock(self.mutex_);
    if (self.idle_bytes_ + block->size <= self.cap_) {
      self.idle_.emplace(block->size, block);
      self.idle_bytes_ += block->size;
      return;
    }
  }
  std::free(block->ptr);
  delete block;
}

}  // namespace

at::Tensor empty_cpu_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, c10::nullopt);
}

void cpu_cache_empty() {
  cache().empty();
}

void cpu_cache_set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "moefast.cpu_cache_set_limit: bytes must be >= 0, got ", bytes);
  cache().set_cap(static_cast<size_t>(bytes));
}

std::tuple<int64_t, int64_t, int64_t, int64_t> cpu_cache_stats() {
  return cache().stats();
}

}  // namespace moefast
