// Shared by seqjax's CPU kernels: the BLAS they call, a row-major GEMM on top of it, the threads they run on, and
// the wrapper that turns their C++ exceptions into XLA errors.
#pragma once

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace seqjax {

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using SetThreadsFn = int (*)(int);

// Set once by seqjax_set_blas (blas.cc) when the library is loaded: the Fortran sgemm, and OpenBLAS's
// openblas_set_num_threads_local (nullptr when the BLAS has none).
extern SgemmFn sgemm;
extern SetThreadsFn set_threads_local;

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C; A stored [M, K] ([K, M] when trans_a) with row stride lda,
// B stored [K, N] ([N, K] when trans_b) with row stride ldb. Column-major that is C^T = op(B)^T op(A)^T.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float* c, int64_t ldc, float beta = 0.0f) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mm = static_cast<int>(m), nn = static_cast<int>(n), kk = static_cast<int>(k), la = static_cast<int>(lda),
            lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const float one = 1.0f;
  sgemm(&tb, &ta, &nn, &mm, &kk, &one, b, &lb, a, &la, &beta, c, &lc);
}

// Runs fn, turning a C++ exception (no memory for working arrays, no thread) into an XLA error naming the kernel
// instead of letting it end the process.
template <typename Fn>
xla::ffi::Error guarded(const char* kernel, Fn fn) {
  try {
    fn();
    return xla::ffi::Error::Success();
  } catch (const std::exception& e) {
    return xla::ffi::Error::Internal(std::string(kernel) + ": " + e.what());
  }
}

inline int64_t usable_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// How many threads to split `items` independent pieces of work between: one per core, each running the BLAS
// single-threaded, when the BLAS lets a thread choose that; otherwise 1 (and the BLAS uses its own threads).
inline int64_t worker_count(int64_t items) {
  return set_threads_local == nullptr ? 1 : std::max<int64_t>(1, std::min(usable_cores(), items));
}

// Runs fn(worker, workers) on `workers` threads (the BLAS single-threaded in each), or inline when workers == 1.
// In OpenBLAS's pthreads builds openblas_set_num_threads_local sets the process-wide count, so the count the caller
// had is restored afterwards (in OpenMP builds the setting is per thread and dies with the workers).
template <typename Fn>
void run_workers(int64_t workers, Fn fn) {
  if (workers <= 1) {
    fn(int64_t{0}, int64_t{1});
    return;
  }
  const int before = set_threads_local(1);
  struct Restore {
    int count;
    ~Restore() { set_threads_local(count); }
  } restore{before};
  std::vector<std::thread> threads;
  threads.reserve(workers);
  std::exception_ptr error;
  std::mutex error_lock;
  auto work = [&](int64_t w) {
    set_threads_local(1);
    try {
      fn(w, workers);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_lock);
      if (!error) error = std::current_exception();
    }
  };
  try {
    for (int64_t w = 0; w < workers; ++w) threads.emplace_back(work, w);
  } catch (...) {  // a thread could not start: let the started ones finish before unwinding
    for (auto& thread : threads) thread.join();
    throw;
  }
  for (auto& thread : threads) thread.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace seqjax
