// moecache copy worker: executes the expert copies that the Python runtime decided on.
//
// The runtime (moecache/runtime) decides in Python *what* to copy and *where* (which slot, which
// victim); this worker only executes: a priority queue ordered by predicted need time, cancellation
// of copies not yet started, dedicated copy stream(s), and per-slot CUDA events that the compute
// stream waits on only for the experts it needs now. No Python runs on the copy path.
//
// Registered as the TorchScript custom class torch.classes.moecache.CopyWorker at load time of
// moecache._C, so it needs no binding code in moecache_ext.cpp. Its pure-Python twins (the "sync"
// and "stream" engines in moecache/runtime/engine.py) are the specification.
//
// Slot states: IDLE (no copy pending; content valid once its last copy's event completed),
// QUEUED (in the priority queue), COPYING (a thread is issuing/doing the copy now), ISSUED (the
// copy is done on the CPU, or enqueued on a copy stream with done_[slot] recorded after it on the
// GPU), FAILED (the copy raised; every later call raises too).
//
// Hazards handled here:
//  * read-after-write: wait() makes the compute stream wait on done_[slot] (device-side, no host
//    sync); on the CPU it blocks until the memcpy finished.
//  * write-after-read: mark_used() records a fence on the compute stream after the kernels that
//    read a slot; the next copy into that slot waits on the fence on its copy stream.
//  * write-after-write: a copy into a slot waits on that slot's previous done_ event, since the
//    two copies may run on different streams.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#endif

#ifdef MOECACHE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

#ifdef MOECACHE_WITH_CUDA
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("moecache copy worker: ") + what + ": " + cudaGetErrorString(err));
  }
}
#endif

enum SlotState : int { IDLE = 0, QUEUED = 1, COPYING = 2, ISSUED = 3, FAILED = 4 };

class CopyWorker : public torch::CustomClassHolder {
 public:
  // src_ptrs: int64 host address of every host-store row (key order); dst: the (slots, numel) pool;
  // max_inflight: copies the worker keeps enqueued on the GPU before it waits (keeps the rest of
  // the queue reorderable and cancellable); num_streams: 1 (shared) or 2 (demand copies get their
  // own stream so they do not queue behind prefetches).
  CopyWorker(at::Tensor src_ptrs, at::Tensor dst, int64_t max_inflight, int64_t num_streams)
      : dst_(dst), max_inflight_(std::max<int64_t>(1, max_inflight)) {
    TORCH_CHECK(src_ptrs.dim() == 1 && src_ptrs.scalar_type() == at::kLong && src_ptrs.device().is_cpu(),
                "src_ptrs must be a 1-D int64 CPU tensor of host addresses");
    TORCH_CHECK(dst.dim() == 2 && dst.is_contiguous(), "dst must be a contiguous (slots, numel) tensor");
    auto p = src_ptrs.contiguous();
    src_.assign(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
    row_bytes_ = static_cast<size_t>(dst.size(1)) * dst.element_size();
    const int64_t slots = dst.size(0);
    state_.assign(slots, IDLE);
    key_.assign(slots, -1);
    qpos_.assign(slots, std::make_tuple(0.0, int64_t{0}));
    urgent_.assign(slots, 0);
    cuda_ = dst.is_cuda();
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) {
      device_ = dst.device().index();
      cuda_check(cudaSetDevice(device_), "cudaSetDevice");
      int lo = 0, hi = 0;
      cuda_check(cudaDeviceGetStreamPriorityRange(&lo, &hi), "cudaDeviceGetStreamPriorityRange");
      const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(2, num_streams)));
      for (int i = 0; i < n; ++i) {
        cudaStream_t s;
        // Demand stream (index 1) gets the highest priority; prefetches the lowest.
        cuda_check(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, i == 1 ? hi : lo), "cudaStreamCreate");
        streams_.push_back(s);
      }
      done_.resize(slots);
      for (auto& e : done_) cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
      fence_.resize(slots);
    }
#else
    TORCH_CHECK(!dst.is_cuda(), "moecache._C was built without CUDA; rebuild it on a machine with nvcc");
#endif
    (void)num_streams;
    // $MOECACHE_COPY_WAIT: "poll" (default) or "sync" (block in cudaEventSynchronize, as before).
    if (const char* how = std::getenv("MOECACHE_COPY_WAIT")) {
      const std::string h(how);
      TORCH_CHECK(h.empty() || h == "poll" || h == "sync", "MOECACHE_COPY_WAIT=", h,
                  " is not a copy wait mode: set it to poll (the default) or sync, or unset it");
      if (h == "sync") poll_us_ = 0;
    }
    thread_ = std::thread([this] { run(); });
  }

  ~CopyWorker() override {
    try {
      close();
    } catch (...) {
    }
  }

  // Queue a copy of host row `key` into `slot`; `priority` is the predicted need time (lower first,
  // 0 = needed now). A copy still queued for the slot is replaced (counted as cancelled).
  void submit(int64_t slot, int64_t key, double priority) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      enqueue_locked(lock, slot, key, priority);
    }
    cv_work_.notify_one();
  }

  // Queue several copies at once (one call from Python for a layer's prefetches), under one lock and
  // with one wake-up of the worker: waking it after each would have it contend for the lock with the
  // rest of the batch.
  void submit_many(std::vector<int64_t> slots, std::vector<int64_t> keys, std::vector<double> priorities) {
    TORCH_CHECK(slots.size() == keys.size() && slots.size() == priorities.size(),
                "submit_many: slots, keys and priorities differ in length");
    if (slots.empty()) return;
    {
      std::unique_lock<std::mutex> lock(mu_);
      for (size_t i = 0; i < slots.size(); ++i) enqueue_locked(lock, slots[i], keys[i], priorities[i]);
    }
    cv_work_.notify_one();
  }

  // The demand path of one MoE layer in one call: queue the copies of `copy_slots` (rows
  // `copy_keys`) as needed now, then make `stream` wait for every slot of `wait_slots` (which
  // includes the fresh copies; wait() issues them at once on the calling thread, so the worker is
  // woken only afterwards, for whatever the wait left queued).
  void demand(std::vector<int64_t> copy_slots, std::vector<int64_t> copy_keys, std::vector<int64_t> wait_slots,
              int64_t stream) {
    TORCH_CHECK(copy_slots.size() == copy_keys.size(), "demand: copy_slots and copy_keys differ in length");
    if (!copy_slots.empty()) {
      std::unique_lock<std::mutex> lock(mu_);
      for (size_t i = 0; i < copy_slots.size(); ++i) enqueue_locked(lock, copy_slots[i], copy_keys[i], 0.0);
    }
    if (!wait_slots.empty()) wait(std::move(wait_slots), stream);
    if (!copy_slots.empty()) cv_work_.notify_one();
  }

  // Remove a copy that has not started. Returns false when it started (or none was queued).
  bool cancel(int64_t slot) {
    std::lock_guard<std::mutex> lock(mu_);
    raise_if_failed();
    check_slot(slot);
    if (state_[slot] != QUEUED) return false;
    queue_.erase(std::make_tuple(std::get<0>(qpos_[slot]), std::get<1>(qpos_[slot]), slot));
    state_[slot] = IDLE;
    key_[slot] = -1;
    ++cancelled_;
    return true;
  }

  // 1 where the slot's last copy has completed (its weights are usable now), else 0. No sync.
  std::vector<int64_t> ready(std::vector<int64_t> slots) {
    std::lock_guard<std::mutex> lock(mu_);
    raise_if_failed();
    std::vector<int64_t> out;
    out.reserve(slots.size());
    for (int64_t s : slots) {
      check_slot(s);
      out.push_back(is_complete_locked(s) ? 1 : 0);
    }
    return out;
  }

  // Make `stream` (the compute stream, as a cudaStream_t integer; 0 on the CPU) wait for the copies
  // of `slots`. Queued copies are issued at once by the calling thread (they are needed now).
  void wait(std::vector<int64_t> slots, int64_t stream) {
    const auto t0 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    raise_if_failed();
    for (int64_t s : slots) {
      check_slot(s);
      if (state_[s] == QUEUED) {
        queue_.erase(std::make_tuple(std::get<0>(qpos_[s]), std::get<1>(qpos_[s]), s));
        state_[s] = COPYING;
        urgent_[s] = 1;
        const int64_t key = key_[s];
        auto fence = fence_for_locked(s);
        const bool fault = fault_in_ > 0 && --fault_in_ == 0;
        lock.unlock();
        try {
          if (fault) throw std::runtime_error("injected fault (test hook)");
          do_copy(s, key, true, fence);
        } catch (const std::exception& e) {
          lock.lock();
          fail_locked(s, e.what());
          throw std::runtime_error(error_);
        }
        lock.lock();
        state_[s] = ISSUED;
        ++stolen_;
        ++copies_;
        cv_done_.notify_all();
      }
      cv_done_.wait(lock, [&] { return state_[s] != COPYING || !error_.empty(); });
      raise_if_failed();
    }
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) {
      auto cs = reinterpret_cast<cudaStream_t>(stream);
      bool all_done = true;
      for (int64_t s : slots) all_done = all_done && cudaEventQuery(done_[s]) == cudaSuccess;
      // Timing events only around waits that can stall: their elapsed time is the stall, read later.
      cudaEvent_t a = nullptr, b = nullptr;
      if (!all_done) {
        a = timing_event_locked();
        b = timing_event_locked();
        cuda_check(cudaEventRecord(a, cs), "cudaEventRecord");
      }
      for (int64_t s : slots) cuda_check(cudaStreamWaitEvent(cs, done_[s], 0), "cudaStreamWaitEvent");
      if (!all_done) {
        cuda_check(cudaEventRecord(b, cs), "cudaEventRecord");
        stalls_.emplace_back(a, b);
      }
      return;
    }
#endif
    (void)stream;
    stall_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

  // The compute stream has enqueued every read of `slots`: later copies into them wait for this.
  void mark_used(std::vector<int64_t> slots, int64_t stream) {
#ifdef MOECACHE_WITH_CUDA
    if (!cuda_) return;
    std::lock_guard<std::mutex> lock(mu_);
    raise_if_failed();
    std::shared_ptr<Fence> f = new_fence_locked();
    cuda_check(cudaEventRecord(f->ev, reinterpret_cast<cudaStream_t>(stream)), "cudaEventRecord");
    for (int64_t s : slots) {
      check_slot(s);
      fence_[s] = f;
    }
#else
    (void)slots;
    (void)stream;
#endif
  }

  // Milliseconds the compute stream spent waiting for copies, as far as resolved (no sync).
  double stall_ms() {
    std::lock_guard<std::mutex> lock(mu_);
#ifdef MOECACHE_WITH_CUDA
    while (!stalls_.empty() && cudaEventQuery(stalls_.front().second) == cudaSuccess) {
      float ms = 0.f;
      cuda_check(cudaEventElapsedTime(&ms, stalls_.front().first, stalls_.front().second), "cudaEventElapsedTime");
      stall_ms_ += ms;
      timing_free_.push_back(stalls_.front().first);
      timing_free_.push_back(stalls_.front().second);
      stalls_.pop_front();
    }
#endif
    return stall_ms_;
  }

  // [copies done, copies cancelled, copies issued by the waiting thread, queued now]
  std::vector<int64_t> counters() {
    std::lock_guard<std::mutex> lock(mu_);
    return {copies_, cancelled_, stolen_, static_cast<int64_t>(queue_.size())};
  }

  // Test hook: the `nth` next copy (1 = the next one), by the worker thread or a waiter, throws.
  void inject_fault(int64_t nth) {
    std::lock_guard<std::mutex> lock(mu_);
    fault_in_ = nth;
  }

  // Test hook: a paused worker thread takes nothing from the queue (waiters still issue their own).
  void pause(bool paused) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      paused_ = paused;
    }
    cv_work_.notify_all();
  }

  // Test hook: the slots the worker thread copied into, oldest first (the last 4096).
  std::vector<int64_t> order() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::vector<int64_t>(order_.begin(), order_.end());
  }

  std::string error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }

  bool is_cuda() const { return cuda_; }

  // Stop the thread, wait for copies in flight, free streams and events. Idempotent.
  void close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
      stop_ = true;
    }
    cv_work_.notify_all();
    if (thread_.joinable()) thread_.join();
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) {
      cudaSetDevice(device_);
      for (auto s : streams_) cudaStreamSynchronize(s);
      for (auto& f : fence_) f.reset();
      for (auto e : done_) cudaEventDestroy(e);
      done_.clear();
      {
        std::lock_guard<std::mutex> lock(*fence_pool_mu_);
        for (auto e : *fence_pool_) cudaEventDestroy(e);
        fence_pool_->clear();
      }
      for (auto& pr : stalls_) {
        cudaEventDestroy(pr.first);
        cudaEventDestroy(pr.second);
      }
      stalls_.clear();
      for (auto e : timing_free_) cudaEventDestroy(e);
      timing_free_.clear();
      for (auto s : streams_) cudaStreamDestroy(s);
      streams_.clear();
    }
#endif
  }

 private:
#ifdef MOECACHE_WITH_CUDA
  // A fence event shared by every slot that one compute step read; back to the pool when unused.
  struct Fence {
    cudaEvent_t ev;
    std::shared_ptr<std::vector<cudaEvent_t>> pool;
    std::shared_ptr<std::mutex> pool_mu;
    ~Fence() {
      std::lock_guard<std::mutex> lock(*pool_mu);
      pool->push_back(ev);
    }
  };
  std::shared_ptr<Fence> new_fence_locked() {
    cudaEvent_t ev;
    {
      std::lock_guard<std::mutex> lock(*fence_pool_mu_);
      if (!fence_pool_->empty()) {
        ev = fence_pool_->back();
        fence_pool_->pop_back();
      } else {
        cuda_check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
      }
    }
    auto f = std::make_shared<Fence>();
    f->ev = ev;
    f->pool = fence_pool_;
    f->pool_mu = fence_pool_mu_;
    return f;
  }
  cudaEvent_t timing_event_locked() {
    if (!timing_free_.empty()) {
      cudaEvent_t e = timing_free_.back();
      timing_free_.pop_back();
      return e;
    }
    cudaEvent_t e;
    cuda_check(cudaEventCreate(&e), "cudaEventCreate");
    return e;
  }
  using FencePtr = std::shared_ptr<Fence>;
#else
  using FencePtr = std::shared_ptr<int>;
#endif

  FencePtr fence_for_locked(int64_t s) {
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) return fence_[s];
#endif
    (void)s;
    return nullptr;
  }

  // submit()'s work with mu_ held (`lock`): a copy being issued into the slot right now finishes
  // first (short); a queued one is replaced.
  void enqueue_locked(std::unique_lock<std::mutex>& lock, int64_t slot, int64_t key, double priority) {
    raise_if_failed();
    check_slot(slot);
    TORCH_CHECK(key >= 0 && key < static_cast<int64_t>(src_.size()), "key ", key, " out of range");
    cv_done_.wait(lock, [&] { return state_[slot] != COPYING || !error_.empty(); });
    raise_if_failed();
    if (state_[slot] == QUEUED) {
      queue_.erase(std::make_tuple(std::get<0>(qpos_[slot]), std::get<1>(qpos_[slot]), slot));
      ++cancelled_;
    }
    state_[slot] = QUEUED;
    key_[slot] = key;
    urgent_[slot] = priority <= 0.0 ? 1 : 0;
    qpos_[slot] = std::make_tuple(priority, seq_++);
    queue_.insert(std::make_tuple(priority, std::get<1>(qpos_[slot]), slot));
  }

  void check_slot(int64_t s) const {
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(state_.size()), "slot ", s, " out of range 0..",
                state_.size() - 1);
  }

  void raise_if_failed() const {
    if (!error_.empty()) throw std::runtime_error(error_);
  }

  void fail_locked(int64_t slot, const std::string& what) {
    if (error_.empty()) error_ = "moecache copy worker failed copying into slot " + std::to_string(slot) + ": " + what;
    state_[slot] = FAILED;
    cv_done_.notify_all();
  }

  bool is_complete_locked(int64_t s) {
    if (state_[s] == QUEUED || state_[s] == COPYING || state_[s] == FAILED) return false;
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) return cudaEventQuery(done_[s]) == cudaSuccess;
#endif
    return true;
  }

  void do_copy(int64_t slot, int64_t key, bool urgent, const FencePtr& fence) {
    char* dst = static_cast<char*>(dst_.data_ptr()) + static_cast<size_t>(slot) * row_bytes_;
    const char* src = reinterpret_cast<const char*>(src_[key]);
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) {
      cudaStream_t s = streams_[urgent && streams_.size() > 1 ? 1 : 0];
      if (fence) cuda_check(cudaStreamWaitEvent(s, fence->ev, 0), "cudaStreamWaitEvent(fence)");
      // The slot's previous copy may sit on the other stream: order the two writes.
      cuda_check(cudaStreamWaitEvent(s, done_[slot], 0), "cudaStreamWaitEvent(previous copy)");
      cuda_check(cudaMemcpyAsync(dst, src, row_bytes_, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
      cuda_check(cudaEventRecord(done_[slot], s), "cudaEventRecord");
      return;
    }
#endif
    (void)urgent;
    (void)fence;
    std::memcpy(dst, src, row_bytes_);
  }

  void run() {
#ifdef __linux__
    pthread_setname_np(pthread_self(), "moecache-copy");  // tells it apart in per-thread CPU time
#endif
#ifdef MOECACHE_WITH_CUDA
    if (cuda_) cudaSetDevice(device_);
#endif
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_work_.wait(lock, [&] { return stop_ || (!queue_.empty() && error_.empty() && !paused_); });
      if (stop_) return;
#ifdef MOECACHE_WITH_CUDA
      if (cuda_) {
        // Keep at most max_inflight copies enqueued; the rest stay reorderable and cancellable.
        inflight_.erase(std::remove_if(inflight_.begin(), inflight_.end(),
                                       [&](int64_t s) { return cudaEventQuery(done_[s]) == cudaSuccess; }),
                        inflight_.end());
        if (static_cast<int64_t>(inflight_.size()) >= max_inflight_) {
          cudaEvent_t oldest = done_[inflight_.front()];
          lock.unlock();
          if (poll_us_ > 0) {
            // Poll rather than block in cudaEventSynchronize: a thread blocked in the driver may hold up
            // the thread that launches the model's kernels. Paired batch-1 runs with prefetch: poll faster
            // in 5 of 7 pairs, within the noise (eval/results/prefetch_ceiling/README.md).
            while (cudaEventQuery(oldest) == cudaErrorNotReady) {
              std::this_thread::sleep_for(std::chrono::microseconds(poll_us_));
            }
          } else {
            cudaEventSynchronize(oldest);
          }
          lock.lock();
          continue;
        }
      }
#endif
      auto it = queue_.begin();
      const int64_t slot = std::get<2>(*it);
      queue_.erase(it);
      state_[slot] = COPYING;
      const int64_t key = key_[slot];
      const bool urgent = urgent_[slot] != 0;
      auto fence = fence_for_locked(slot);
      const bool fault = fault_in_ > 0 && --fault_in_ == 0;
      lock.unlock();
      std::string err;
      try {
        if (fault) throw std::runtime_error("injected fault (test hook)");
        do_copy(slot, key, urgent, fence);
      } catch (const std::exception& e) {
        err = e.what();
      }
      lock.lock();
      if (!err.empty()) {
        fail_locked(slot, err);
        continue;  // stays alive but idle: every later call raises the error
      }
      state_[slot] = ISSUED;
      ++copies_;
      order_.push_back(slot);
      if (order_.size() > 4096) order_.pop_front();
      if (cuda_) inflight_.push_back(slot);
      cv_done_.notify_all();
    }
  }

  at::Tensor dst_;
  std::vector<int64_t> src_;
  size_t row_bytes_ = 0;
  int64_t max_inflight_;
  int64_t poll_us_ = 20;  // > 0: the worker polls its oldest copy every poll_us_ instead of blocking on it
  bool cuda_ = false;
  int device_ = 0;

  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::thread thread_;
  bool stop_ = false, closed_ = false, paused_ = false;
  std::deque<int64_t> order_;
  std::string error_;
  int64_t fault_in_ = 0;

  std::vector<int> state_;
  std::vector<int64_t> key_;
  std::vector<char> urgent_;
  std::vector<std::tuple<double, int64_t>> qpos_;
  std::set<std::tuple<double, int64_t, int64_t>> queue_;  // (priority, sequence, slot)
  int64_t seq_ = 0;
  std::deque<int64_t> inflight_;

  int64_t copies_ = 0, cancelled_ = 0, stolen_ = 0;
  double stall_ms_ = 0.0;

#ifdef MOECACHE_WITH_CUDA
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> done_;
  std::vector<std::shared_ptr<Fence>> fence_;
  std::shared_ptr<std::vector<cudaEvent_t>> fence_pool_ = std::make_shared<std::vector<cudaEvent_t>>();
  std::shared_ptr<std::mutex> fence_pool_mu_ = std::make_shared<std::mutex>();
  std::deque<std::pair<cudaEvent_t, cudaEvent_t>> stalls_;
  std::vector<cudaEvent_t> timing_free_;
#endif
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(moecache, m) {
  m.class_<CopyWorker>("CopyWorker")
      .def(torch::init<at::Tensor, at::Tensor, int64_t, int64_t>())
      .def("submit", &CopyWorker::submit)
      .def("submit_many", &CopyWorker::submit_many)
      .def("demand", &CopyWorker::demand)
      .def("cancel", &CopyWorker::cancel)
      .def("ready", &CopyWorker::ready)
      .def("wait", &CopyWorker::wait)
      .def("mark_used", &CopyWorker::mark_used)
      .def("stall_ms", &CopyWorker::stall_ms)
      .def("counters", &CopyWorker::counters)
      .def("inject_fault", &CopyWorker::inject_fault)
      .def("pause", &CopyWorker::pause)
      .def("order", &CopyWorker::order)
      .def("error", &CopyWorker::error)
      .def("is_cuda", &CopyWorker::is_cuda)
      .def("close", &CopyWorker::close);
}
