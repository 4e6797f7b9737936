"""seqjax's CPU kernels in C++ (XLA FFI custom calls), built on first use.

`attention.cc` holds multi-head self-attention's forward and backward pass from the fused q/k/v projection, and
`lstm.cc` and `gru.cc` an LSTM's and a GRU layer's forward and backward pass over a whole sequence (`recurrent.h`
holds what those two share). They are compiled, as one library, the
first time a module asks for them with the machine's C++ compiler (`$CXX`, else `g++`, `c++` or `clang++`), for the
machine's own CPU, into a cache folder (`$SEQJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/seqjax` or `~/.cache/seqjax`),
keyed by the source, the flags, the jaxlib version and the CPU; later processes load the built library. The recurrent
kernels' products run on a micro-kernel of their own; the attention kernel's call the `sgemm` of the OpenBLAS that
scipy loads (JAX itself depends on scipy),
single-threaded within each of the kernel's own threads (`openblas_set_num_threads_local`, OpenBLAS >= 0.3.27; in
OpenBLAS's pthreads builds that count is process-wide, so a kernel call restores the previous count when it ends).

Nothing depends on it: where there is no compiler or no such OpenBLAS, the build fails, or `SEQJAX_NATIVE=0` is set,
`available()` is False (`unavailable_reason()` says why) and the kernels in JAX ops run instead, which compute the
same function. This module builds and loads; `ffi.kernel` wraps a custom call; `attention`, `lstm` and `gru` are the
kernels (each with its `applies`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

from .portable import portable_under_export

_log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_SOURCES = ("blas.cc", "attention.cc", "lstm.cc", "gru.cc")
_HEADERS = ("common.h", "recurrent.h")
_TARGETS = {
    "seqjax_attention_forward": "SeqjaxAttentionForward",
    "seqjax_attention_backward": "SeqjaxAttentionBackward",
    "seqjax_lstm_forward": "SeqjaxLstmForward",
    "seqjax_lstm_inference": "SeqjaxLstmInference",
    "seqjax_lstm_backward": "SeqjaxLstmBackward",
    "seqjax_gru_forward": "SeqjaxGruForward",
    "seqjax_gru_inference": "SeqjaxGruInference",
    "seqjax_gru_backward": "SeqjaxGruBackward",
}
# Tried in order: (compiler flags, link flags). -ffast-math lets GCC call glibc's vectorised expf (libmvec) in the
# softmax loops; it is given to the compile step only, since linking with it would add crtfastmath.o, which switches
# the whole process to flush-to-zero arithmetic when the library loads.
_FLAG_SETS = (
    (["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17"], ["-lmvec", "-pthread"]),
    (["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17"], ["-pthread"]),
    (["-O2", "-fPIC", "-std=c++17"], ["-pthread"]),
)

_lock = threading.Lock()
_library = None  # the loaded library (kept alive), once loaded
_reason: str | None = None  # None until the first attempt; then why it failed, or "" when it loaded


def available() -> bool:
    """Whether the CPU kernels are registered with XLA, building and loading them on the first call."""
    global _reason, _library
    with _lock:
        if _reason is None:
            try:
                _library, _reason = _load(), ""
            except Exception as e:  # any failure means: use the XLA formulation
                _reason = f"{type(e).__name__}: {e}"
                _log.info("seqjax CPU kernels unavailable, using XLA ops: %s", _reason)
        return _library is not None


def with_derivatives_of(reference):
    """Decorates a custom-call wrapper `call(*args)` that computes what `reference(*args)` computes (in JAX ops),
    giving it the reference's derivatives, since a custom call has none: a `jax.custom_jvp` whose rule is the
    reference's JVP, so that a layer's hand-written backward pass that calls kernels can itself be differentiated in
    either mode (gradients of gradients, `jax.hessian`). Only derivatives of the call run the reference, and so does
    a program lowered by `jax.export`, which cannot serialize the custom call (`portable.py`)."""

    def wrap(call):
        f = jax.custom_jvp(portable_under_export(call, reference))
        f.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
        return f

    return wrap


def recurrent_vectorised() -> bool:
    """Whether the LSTM and GRU kernels were built with their AVX2/FMA micro-kernel (without it, XLA's dots are
    faster)."""
    return available() and bool(_library.seqjax_recurrent_vectorised())


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    available()
    return _reason


def _cache_dir() -> Path:
    if os.environ.get("SEQJAX_CACHE_DIR"):
        return Path(os.environ["SEQJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seqjax"


def _cpu_identity() -> str:
    """The CPU model and feature flags, since the library is built with -march=native."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (set CXX)")


def _build(cxx: str, flags: list[str], libs: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objects = [Path(tmp, Path(src).with_suffix(".o").name) for src in _SOURCES]
        lib = Path(tmp, "kernels.so")
        compile_ = [cxx, *flags, "-I", jax.ffi.include_dir(), "-I", str(_HERE), "-c"]
        commands = [[*compile_, str(_HERE / src), "-o", str(obj)] for src, obj in zip(_SOURCES, objects, strict=True)]
        for cmd in [*commands, [cxx, "-shared", *map(str, objects), "-o", str(lib), *libs]]:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: concurrent builders (pytest-xdist workers) each build in their own folder


def _openblas() -> tuple[int, int]:
    """(sgemm, openblas_set_num_threads_local) addresses from one OpenBLAS library loaded in this process, scipy's
    first (numpy may bring a second, 64-bit-integer one). The kernels run one single-threaded BLAS per core of their
    own; a BLAS that cannot be told so (OpenBLAS before 0.3.27, or another BLAS) made them slower than XLA's, so
    without one they stay off."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS into the process)

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError as e:
        raise RuntimeError("cannot list the process's libraries to find OpenBLAS") from e
    paths = {ln.split()[-1] for ln in maps if "openblas" in ln.lower() and ln.split()[-1].startswith("/")}
    for path in sorted(paths, key=lambda p: "scipy.libs" not in p):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        sgemm = next((n for n in ("scipy_sgemm_", "sgemm_") if hasattr(library, n)), None)  # 32-bit integers
        if sgemm and hasattr(library, "openblas_set_num_threads_local"):
            address = lambda name, lib=library: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            return address(sgemm), address("openblas_set_num_threads_local")
    raise RuntimeError(f"no OpenBLAS with openblas_set_num_threads_local among {sorted(paths)}")


def _load():
    if os.environ.get("SEQJAX_NATIVE", "1") == "0":
        raise RuntimeError("disabled by SEQJAX_NATIVE=0")
    blas = _openblas()
    cxx = _compiler()
    source = b"\0".join((_HERE / name).read_bytes() for name in (*_SOURCES, *_HEADERS))
    errors = []
    for flags, libs in _FLAG_SETS:
        parts = [source, cxx, " ".join(flags + libs), jaxlib.__version__, _cpu_identity()]
        key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:16]
        path = _cache_dir() / f"seqjax_native_{key}.so"
        try:
            if not path.exists():
                _build(cxx, flags, libs, path)
            library = ctypes.CDLL(str(path))
            break
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            errors.append(str(e))
    else:
        raise RuntimeError("could not build the CPU kernels:\n" + "\n".join(errors))
    library.seqjax_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.seqjax_set_blas(*blas)
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library
