// Memory read bandwidth of this machine: N threads each stream their share of a 512 MiB buffer
// through 512-bit loads (needs AVX-512F), five times. The ceiling for a decode step's weights,
// which are read once a token.
//
//   g++ -O3 -mavx512f -pthread benchmarks/cpu_read_bandwidth.cpp -o /tmp/bw && /tmp/bw 2 && /tmp/bw 1
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2;
  const size_t bytes = 512ul << 20;
  char* buf = static_cast<char*>(aligned_alloc(4096, bytes));
  memset(buf, 1, bytes);
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<std::thread> pool;
    std::vector<int> sums(threads);
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const size_t n = bytes / threads;
        const char* p = buf + t * n;
        __m512i acc = _mm512_setzero_si512();
        for (size_t i = 0; i < n; i += 256) {
          acc = _mm512_add_epi32(acc, _mm512_load_si512(p + i));
          acc = _mm512_add_epi32(acc, _mm512_load_si512(p + i + 64));
          acc = _mm512_add_epi32(acc, _mm512_load_si512(p + i + 128));
          acc = _mm512_add_epi32(acc, _mm512_load_si512(p + i + 192));
        }
        sums[t] = _mm512_reduce_add_epi32(acc);  // keeps the loads
      });
    }
    for (auto& t : pool) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("%d thread(s): %.1f GB/s (check %d)\n", threads, bytes / s / 1e9, sums[0]);
  }
  free(buf);
}
