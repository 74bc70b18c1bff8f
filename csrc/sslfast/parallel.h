// Threads of the CPU kernels: when a call goes parallel, and a pool that never spins.
//
// When: each op's work threshold is below (one place). Under it a call runs on the calling
// thread: the fork/join costs more than a second thread saves. Above it the team has
// min(torch.get_num_threads(), items) threads. torch.set_num_threads and OMP_NUM_THREADS are
// honoured: torch and this module share one libgomp (same soname), so omp_get_max_threads()
// here reads the count torch set.
//
// How (parallel_for): a persistent pool whose idle workers sleep on a condition variable.
// libgomp's barriers spin (300000 spins by default) waiting for every thread of the team;
// on a busy machine one descheduled thread then stalls the others while they burn the CPU it
// needs (issue 12: sample_negatives 6 ms on two threads against 2 ms on one with three busy
// processes). OMP_WAIT_POLICY cannot fix that from here: libgomp reads it when it is loaded,
// which torch's import does before this module exists. In the pool, items are claimed in
// chunks from an atomic counter and the caller works too, so a worker that has not woken yet
// is never waited for (the others take its items); the caller waits, blocking and not
// spinning, only for chunks already claimed. That wait is still a scheduling delay when the
// CPUs are oversubscribed (a worker preempted inside its chunk), so the pool watches it: a
// parallel call whose caller waited longer than it worked sends the next calls to the
// calling thread alone (16 calls, doubling up to 1024 while it keeps happening, then a
// parallel call probes again), which keeps two threads within noise of one under
// contention. After fork() (data-loader workers) the child starts a fresh pool.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sslfast {
namespace parallel {

// ------------------------------------------------------------------ work thresholds, per op
// In each op's own unit of work. The samplers' values were measured on the 2-core machine
// (below them two threads were slower than one, quiet machine); the others are set to about
// the same time of single-thread work (some tens of microseconds) from their inner loops.
constexpr int64_t kMinNegativeDraws = 65536;         // sample_negatives: masked frames * (K + Kc)
constexpr int64_t kMinNegativeScanFrames = 262144;   // sample_negatives' row scan: B * T
constexpr int64_t kMinMaskFrames = 262144;           // compute_mask_indices: B * T
constexpr int64_t kMinApplyMaskElements = 65536;     // apply_mask: B * T * D
constexpr int64_t kMinContrastiveMacs = 1 << 18;     // contrastive_loss: N * (K + 1) * D
constexpr int64_t kMinGumbelElements = 1 << 16;      // gumbel_vector_quantize: N * G * (V + d)
constexpr int64_t kMinInfoNceMacs = 1 << 20;         // info_nce: rows * cols * D

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

// The team size for `work` units over `items` independent items: 1 below the threshold.
inline int threads_for(int64_t work, int64_t min_work, int64_t items) {
  if (work < min_work || items < 2) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), items)));
}

// For the kernels that stay on OpenMP regions: `#pragma omp parallel if (parallel::use_threads(...))`.
inline bool use_threads(int64_t work, int64_t min_work) { return work >= min_work && max_threads() > 1; }

// ------------------------------------------------------------------ the pool

class Pool {
 public:
  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); }); });
    return *instance();
  }

  // fn(begin, end, worker) over [0, n) in chunks of `chunk`, on up to `threads` threads
  // (worker 0 is the caller; workers are < threads). Returns the team size it asked for.
  template <class Fn>
  int run(int64_t n, int threads, int64_t chunk, Fn&& fn) {
    chunk = std::max<int64_t>(chunk, 1);
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (n + chunk - 1) / chunk)));
    last_requested_.store(threads);
    std::unique_lock<std::mutex> busy(run_m_, std::defer_lock);
    // small, nested or concurrent, or backing off after a contended call: the caller alone
    bool alone = threads <= 1 || !busy.try_lock();
    if (!alone && skip_ > 0) {
      --skip_;
      alone = true;
    }
    if (alone) {
      if (n > 0) fn(int64_t(0), n, 0);
      last_threads_.store(1);
      return 1;
    }
    grow(threads - 1);
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    auto call = [](void* ctx, int64_t b, int64_t e, int w) { (*static_cast<std::decay_t<Fn>*>(ctx))(b, e, w); };
    {
      std::lock_guard<std::mutex> lk(m_);
      ctx_ = static_cast<void*>(&fn);
      call_ = call;
      n_ = n;
      chunk_ = chunk;
      next_.store(0);
      wanted_ = threads - 1;
      open_ = true;
      ++gen_;
    }
    wake_.notify_all();
    work(0);
    const auto t1 = clock::now();
    {
      std::unique_lock<std::mutex> lk(m_);
      open_ = false;  // late wakers skip this job
      idle_.wait(lk, [&] { return inside_ == 0; });
      call_ = nullptr;
    }
    const auto t2 = clock::now();
    if (t2 - t1 > t1 - t0) {  // waited longer than worked: the workers were not running
      backoff_ = backoff_ ? std::min(2 * backoff_, kMaxBackoff) : kMinBackoff;
      skip_ = backoff_;
    } else {
      backoff_ = 0;
    }
    last_threads_.store(threads);
    return threads;
  }

  // The team size of the last call (1: it ran on the calling thread) and the size it asked
  // for before the contention back-off (for the tests of torch.set_num_threads).
  int last_threads() const { return last_threads_.load(); }
  int last_requested() const { return last_requested_.load(); }

 private:
  static Pool*& instance() {
    static Pool* p = new Pool();  // never destroyed: workers sleep until the process exits
    return p;
  }

  void grow(int workers) {
    while (static_cast<int>(n_threads_) < workers) {
      const int id = static_cast<int>(n_threads_++);
      uint64_t gen;
      {
        std::lock_guard<std::mutex> lk(m_);
        gen = gen_;  // the worker waits for the next job, the one about to be posted
      }
      std::thread([this, id, gen] { loop(id + 1, gen); }).detach();
    }
  }

  void work(int worker) {
    for (;;) {
      const int64_t b = next_.fetch_add(chunk_);
      if (b >= n_) return;
      call_(ctx_, b, std::min(b + chunk_, n_), worker);
    }
  }

  void loop(int worker, uint64_t seen) {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      wake_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (!open_ || worker > wanted_) continue;
      ++inside_;
      lk.unlock();
      work(worker);
      lk.lock();
      if (--inside_ == 0) idle_.notify_all();
    }
  }

  std::mutex run_m_;  // one job at a time
  std::mutex m_;
  std::condition_variable wake_, idle_;
  size_t n_threads_ = 0;
  uint64_t gen_ = 0;
  bool open_ = false;
  int wanted_ = 0, inside_ = 0;
  std::atomic<int64_t> next_{0};
  int64_t n_ = 0, chunk_ = 1;
  void* ctx_ = nullptr;
  void (*call_)(void*, int64_t, int64_t, int) = nullptr;
  std::atomic<int> last_threads_{1}, last_requested_{1};
  static constexpr int kMinBackoff = 16, kMaxBackoff = 1024;
  int skip_ = 0, backoff_ = 0;  // under run_m_
};

// parallel_for(n, threads, chunk, fn(begin, end, worker)): see Pool::run.
template <class Fn>
inline int parallel_for(int64_t n, int threads, int64_t chunk, Fn&& fn) {
  return Pool::get().run(n, threads, chunk, std::forward<Fn>(fn));
}

}  // namespace parallel
}  // namespace sslfast
