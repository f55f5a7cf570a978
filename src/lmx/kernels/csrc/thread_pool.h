// A small fork-join pool. Between jobs a worker polls for the next one for a short while (kSpin),
// then sleeps on a condition variable: a decode step hands the pool a job every ~0.1 ms, and waking a
// sleeping thread costs about as long as a small product takes; a pool that polled without end would,
// on a shared machine, steal the core its partner needs (see RESULTS.md), so polling stops soon after
// the jobs do.
//
// A job is a number of chunks claimed one at a time from an atomic counter, by the calling thread
// and by whichever workers wake in time. The caller never waits for a worker that has not started:
// when the chunks run out it closes the job to latecomers and waits only for the workers that joined
// (each finishing the chunk it holds). On a loaded machine, where a woken worker may get no core for
// a while, the caller then simply does the work itself.
#pragma once

#include <atomic>
#include <chrono>
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
    bool sleeping;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      ++generation_;
      posted_.store(generation_, std::memory_order_release);
      sleeping = sleepers_ > 0;
    }
    if (sleeping) {
      wake_.notify_all();
    }
    claim_all(fn);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;  // latecomers find no job and go back to waiting
    }
    // The workers that joined are each finishing one chunk: poll for them, then sleep.
    if (!poll([this] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return active_.load() == 0; });
    }
  }

  // How long a thread polls before it sleeps (0: it sleeps at once); the pool's default is kSpin.
  void set_spin(std::chrono::microseconds spin) {
    spin_us_.store(spin.count());
  }

 private:
  static constexpr std::chrono::microseconds kSpin{200};

  void claim_all(const std::function<void(int64_t)>& fn) {
    for (int64_t i; (i = next_.fetch_add(1)) < total_;) {
      fn(i);
    }
  }

  // Poll ready() for up to the spin time; whether it came true.
  template <class F>
  bool poll(F&& ready) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_.load());
    for (int i = 0;; ++i) {
      if (ready()) {
        return true;
      }
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) {
        return false;
      }
      pause();
    }
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    uint64_t joined = generation_;  // the last job this worker took part in (or saw closed)
    auto ready = [&] { return stopping_ || (job_ != nullptr && generation_ != joined); };
    for (;;) {
      if (!ready()) {
        lock.unlock();
        poll([&] { return posted_.load(std::memory_order_acquire) != joined || stopping_posted_.load(); });
        lock.lock();
        ++sleepers_;
        wake_.wait(lock, ready);
        --sleepers_;
      }
      if (stopping_) {
        return;
      }
      joined = generation_;
      const std::function<void(int64_t)>* job = job_;
      active_.fetch_add(1);
      lock.unlock();
      claim_all(*job);
      lock.lock();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        done_.notify_one();
      }
    }
  }

  // Caller holds job_mutex_ (so no job is running).
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      stopping_posted_.store(true);
    }
    wake_.notify_all();
    for (auto& t : workers_) {
      t.join();
    }
    workers_.clear();
    stopping_posted_.store(false);
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
  std::atomic<uint64_t> posted_{0};  // generation_, readable without the mutex (for polling)
  std::atomic<int> active_{0};       // workers inside a job
  int sleepers_ = 0;                 // workers waiting on wake_
  bool stopping_ = false;
  std::atomic<bool> stopping_posted_{false};
  std::atomic<int64_t> spin_us_{kSpin.count()};
};

}  // namespace lmx
