// A small work-claiming thread pool for the CPU sparse kernels, used when CAP_DS_CPU_THREADING=taskpool (the
// default is ATen's OpenMP team, faster on a machine the model has to itself: see spmm_cpu.cpp).
//
// Why not at::parallel_for (OpenMP): its region ends in a barrier that waits for every team thread, including
// one the OS has not scheduled yet. On a shared machine that wait is a scheduler time slice (milliseconds),
// longer than a whole 97%-sparse product. Here the calling thread starts on the tasks at once, pool threads
// join when they get a CPU and claim tasks one at a time, and the caller waits only for tasks actually claimed:
// a late helper finds nothing left and goes back to sleep.
#pragma once

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace cap {

class TaskPool {
 public:
  // The process-wide pool (re-created in a forked child, whose copy has no threads).
  static TaskPool& get() {
    static std::mutex init_mu;
    static TaskPool* pool = nullptr;
    std::lock_guard<std::mutex> lk(init_mu);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new TaskPool();  // never destroyed: threads are detached
    return *pool;
  }

  // fn(task) for every task in [0, ntasks), on the caller plus at most workers - 1 pool threads.
  void run(int64_t ntasks, int64_t workers, const std::function<void(int64_t)>& fn) {
    if (ntasks <= 0) return;
    workers = std::min(workers, ntasks);
    if (workers <= 1) {
      for (int64_t t = 0; t < ntasks; ++t) fn(t);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->ntasks = ntasks;
    job->slots = workers - 1;
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int64_t>(threads_) < workers - 1) {
        std::thread(&TaskPool::worker, this).detach();
        ++threads_;
      }
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
    job->work();
    while (job->done.load(std::memory_order_acquire) < ntasks) std::this_thread::yield();
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (job_ == job) job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;  // only dereferenced for a claimed task: caller still waits
    int64_t ntasks = 0;
    std::atomic<int64_t> next{0}, done{0}, slots{0};
    std::exception_ptr error;
    std::mutex error_mu;

    void work() {
      for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
        try {
          (*fn)(t);
        } catch (...) {
          std::lock_guard<std::mutex> lk(error_mu);
          if (!error) error = std::current_exception();
        }
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  TaskPool() : pid_(getpid()) {}

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job && job->slots.fetch_sub(1) > 0) job->work();
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  size_t threads_ = 0;
};

}  // namespace cap
