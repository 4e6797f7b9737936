// The BLAS functions seqjax's CPU kernels call, set by the Python loader (seqjax/kernels/cpu/__init__.py).
#include "common.h"

namespace seqjax {
SgemmFn sgemm = nullptr;
SetThreadsFn set_threads_local = nullptr;
}  // namespace seqjax

extern "C" void seqjax_set_blas(void* sgemm, void* set_threads_local) {
  seqjax::sgemm = reinterpret_cast<seqjax::SgemmFn>(sgemm);
  seqjax::set_threads_local = reinterpret_cast<seqjax::SetThreadsFn>(set_threads_local);
}
