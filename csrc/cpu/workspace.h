// Reused memory for the large per-call CPU buffers: what a forward saves for its backward (gates,
// cells) and the backward's own (N, G) temporaries.
//
// Why: each training step allocates these afresh and frees them after the backward. Blocks above
// glibc's mmap threshold (32 MB at most) are mmapped on every allocation and page-faulted in page by
// page; at (B,T,I,H) = (64,200,128,256) the 52 MB gate matrix alone cost ~30 ms of page faults
// per forward, a third of the step. Freed blocks are kept here (up to TIMEREC_CPU_CACHE_MB, 512 by
// default; 0 turns the cache off) and handed to the next call that fits.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace timerec::cpu {

class WorkspaceCache {
 public:
  static WorkspaceCache& instance() {
    static WorkspaceCache* cache = new WorkspaceCache();  // never destroyed: deleters may run late
    return *cache;
  }

  void* take(size_t bytes, size_t* got) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = blocks_.size();
      for (size_t i = 0; i < blocks_.size(); ++i)  // smallest block that fits, at most 2x
        if (blocks_[i].bytes >= bytes && blocks_[i].bytes <= 2 * bytes &&
            (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
          best = i;
      if (best < blocks_.size()) {
        Block b = blocks_[best];
        blocks_.erase(blocks_.begin() + best);
        cached_ -= b.bytes;
        *got = b.bytes;
        return b.ptr;
      }
    }
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    TORCH_CHECK(p != nullptr, "timerec_fast: out of memory allocating ", rounded, " bytes");
    *got = rounded;
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= limit_) {
        blocks_.push_back({p, bytes});
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  size_t limit() const { return limit_; }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  WorkspaceCache() {
    const char* env = std::getenv("TIMEREC_CPU_CACHE_MB");
    long mb = env != nullptr ? std::strtol(env, nullptr, 10) : 512;
    limit_ = static_cast<size_t>(mb < 0 ? 0 : mb) << 20;
  }
  std::mutex mutex_;
  std::vector<Block> blocks_;
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// at::empty for an internal buffer of the ops; small ones go to the normal allocator. The tensor
// cannot be resized (its storage is borrowed from the cache).
inline at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  constexpr size_t kMinBytes = size_t{1} << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(
                                                        c10::typeMetaToScalarType(opts.dtype()));
  auto& cache = WorkspaceCache::instance();
  if (bytes < kMinBytes || cache.limit() == 0 || !opts.device().is_cpu())
    return at::empty(sizes, opts);
  size_t got = 0;
  void* p = cache.take(bytes, &got);
  return at::from_blob(
      p, sizes, [got](void* q) { WorkspaceCache::instance().give_back(q, got); }, opts);
}

}  // namespace timerec::cpu
