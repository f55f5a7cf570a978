// A small fork-join pool whose workers sleep on a condition variable between jobs (no spin-waiting:
// on a shared machine a spinning BLAS thread steals the core its partner needs; see RESULTS.md).
//
// A job is a number of chunks claimed one at a time from an atomic counter, by the calling thread
// and by whichever workers wake in time. The caller never waits for a worker that has not started:
// when the chunks run out it closes the job to latecomers and waits only for the workers that joined
// (each finishing the chunk it holds). On a loaded machine, where a woken worker may get no core for
// a while, the caller then simply does the work itself.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lmx {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    resize(threads);
  }
  ~ThreadPool() {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    stop_workers();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Threads in all, the caller of run() included.
  int size() {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    return static_cast<int>(workers_.size()) + 1;
  }

  void resize(int threads) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    stop_workers();
    stopping_ = false;
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { work(); });
    }
  }

  // Run fn(0) .. fn(chunks - 1), each once, spread over the pool; returns when all are done.
  // One job at a time: callers from several threads take turns (job_mutex_).
  void run(int64_t chunks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    next_.store(0);
    total_ = chunks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      ++generation_;
    }
    wake_.notify_all();
    claim_all(fn);
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;  // latecomers find no job and go back to sleep
    done_.wait(lock, [this] { return active_ == 0; });
  }

 private:
  void claim_all(const std::function<void(int64_t)>& fn) {
    for (int64_t i; (i = next_.fetch_add(1)) < total_;) {
      fn(i);
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    uint64_t joined = generation_;  // the last job this worker took part in (or saw closed)
    for (;;) {
      wake_.wait(lock, [&] { return stopping_ || (job_ != nullptr && generation_ != joined); });
      if (stopping_) {
        return;
      }
      joined = generation_;
      const std::function<void(int64_t)>* job = job_;
      ++active_;
      lock.unlock();
      claim_all(*job);
      lock.lock();
      if (--active_ == 0) {
        done_.notify_one();
      }
    }
  }

  // Caller holds job_mutex_ (so no job is running).
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) {
      t.join();
    }
    workers_.clear();
  }

  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t total_ = 0;
  uint64_t generation_ = 0;
  int active_ = 0;
  bool stopping_ = false;
};

}  // namespace lmx
