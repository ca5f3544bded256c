// The timing model of moecache/cost/timing.py (Timeline): the copy engine, the GPU and the CPU, each
// serving its work in issue order. Every float operation in the reference's order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <queue>
#include <vector>

namespace moecache_sim {

// Copies the runtime's worker keeps outstanding on the GPU (copy_queue.py WORKER_INFLIGHT).
constexpr int64_t WORKER_INFLIGHT = 2;

struct Job {
  double ready;
  int64_t key;
  double ms;
  bool operator<(const Job& o) const { return ready < o.ready || (ready == o.ready && key < o.key); }
};

struct Timeline {
  double gpu = 0.0, copy = 0.0, cpu = 0.0, gpu_busy = 0.0, copy_busy = 0.0, cpu_busy = 0.0;
  double non_expert(double ms, double slow) {
    if (copy > gpu) ms = ms * slow;
    gpu += ms;
    gpu_busy += ms;
    return gpu;
  }
  double issue_copy(double t, double ms) {
    const double start = t > copy ? t : copy;
    copy = start + ms;
    copy_busy += ms;
    return copy;
  }
  double issue_cpu(double t, double ms) {
    const double start = t > cpu ? t : cpu;
    cpu = start + ms;
    cpu_busy += ms;
    return cpu;
  }
  void compute(std::vector<Job>& jobs, double slow) {
    // keys are distinct within a wave, so (ready, key) is the full tuple order of the reference
    if (jobs.size() > 16) {
      std::sort(jobs.begin(), jobs.end());
    } else {
      for (size_t i = 1; i < jobs.size(); ++i) {
        const Job x = jobs[i];
        size_t j = i;
        while (j > 0 && x < jobs[j - 1]) {
          jobs[j] = jobs[j - 1];
          --j;
        }
        jobs[j] = x;
      }
    }
    double g = gpu, busy = gpu_busy;
    const double cp = copy;
    for (const Job& j : jobs) {
      if (j.ready > g) g = j.ready;
      const double ms = cp > g ? j.ms * slow : j.ms;
      g += ms;
      busy += ms;
    }
    gpu = g;
    gpu_busy = busy;
  }
  void join(double t) {
    if (t > gpu) gpu = t;
  }
};

// moecache/sim/copy_queue.py WorkerQueue: the runtime's copy worker over a Timeline whose ``copy`` is the
// end of the copies already taken. Queued prefetches (priority, then issue order) are taken when fewer than
// two copies are outstanding; a queued one can be cancelled or promoted to a demand copy.
struct QueuedCopy {
  double prio;
  int64_t seq;
  int64_t key;
  double issue;
};

struct QueuedLater {  // the heap's order: the lowest (priority, seq) on top
  bool operator()(const QueuedCopy& a, const QueuedCopy& b) const {
    return a.prio > b.prio || (a.prio == b.prio && a.seq > b.seq);
  }
};

struct WorkerQueue {
  Timeline& tl;
  double copy_ms, lag;
  std::deque<QueuedCopy> waiting;  // in issue order, not yet a candidate
  std::priority_queue<QueuedCopy, std::vector<QueuedCopy>, QueuedLater> heap;
  std::vector<int64_t> live;       // key -> seq of its queued copy (0: none)
  int64_t seq = 0;
  double issued_free = 0.0;        // the runtime's own backlog estimate: every copy issued, in a FIFO
  int64_t issued = 0, cancelled = 0;

  WorkerQueue(Timeline& tl_, double copy_ms_, int64_t keys)
      : tl(tl_), copy_ms(copy_ms_), lag(static_cast<double>(WORKER_INFLIGHT - 1) * copy_ms_), live(keys, 0) {}

  void note_issued(double t) {
    const double start = t > issued_free ? t : issued_free;
    issued_free = start + copy_ms;
    ++issued;
  }
  void submit(double t, int64_t key, double prio) {
    ++seq;
    waiting.push_back({prio, seq, key, t});
    live[key] = seq;
  }
  bool queued(int64_t key) const { return live[key] != 0; }
  void advance(double t, std::vector<double>& ready_at) {
    while (!heap.empty() || !waiting.empty()) {
      double take = tl.copy - lag;
      if (heap.empty() && waiting.front().issue > take) take = waiting.front().issue;
      if (take > t) return;
      while (!waiting.empty() && waiting.front().issue <= take) {
        heap.push(waiting.front());
        waiting.pop_front();
      }
      const QueuedCopy q = heap.top();
      heap.pop();
      if (live[q.key] != q.seq) continue;  // cancelled
      live[q.key] = 0;
      ready_at[q.key] = tl.issue_copy(take, copy_ms);
    }
  }
  bool cancel(int64_t key) {
    if (!live[key]) return false;
    live[key] = 0;
    ++cancelled;
    return true;
  }
  double promote(int64_t key, double t) {
    live[key] = 0;
    return tl.issue_copy(t, copy_ms);
  }
};

}  // namespace moecache_sim
