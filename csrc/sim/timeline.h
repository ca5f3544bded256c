// The timing model of moecache/cost/timing.py (Timeline): the copy engine, the GPU and the CPU, each
// serving its work in issue order. Every float operation in the reference's order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moecache_sim {

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

}  // namespace moecache_sim
