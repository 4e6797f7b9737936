"""The one pattern every C++ kernel call follows, written once.

A C++ kernel is an XLA FFI custom call that computes what a reference function in JAX ops computes. `kernel` turns
(target name, reference, result shapes) into a function that runs the custom call where the program is lowered for
a CPU and the reference elsewhere (`lax.platform_dependent`: a program traced here and lowered or exported for a GPU
or TPU holds no CPU custom call), and that has the reference's derivatives (a custom call has none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.kernels.cpu import with_derivatives_of


def f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def kernel(target: str, reference: Callable, result_shapes: Callable) -> Callable:
    """`run(*args, precision=None)` = `reference(*args, precision=precision)`, computed by the registered custom
    call `target` on CPU. `result_shapes(*args)` gives the call's result `ShapeDtypeStruct`(s); a tuple of them
    makes the call return a tuple. The custom call's derivatives are the reference's (`with_derivatives_of`), so a
    hand-written backward pass that calls kernels can itself be differentiated."""

    @with_derivatives_of(reference)
    def call(*args):
        out = jax.ffi.ffi_call(target, result_shapes(*args), vmap_method="sequential")(*args)
        return tuple(out) if isinstance(out, list | tuple) else out

    def run(*args, precision: lax.PrecisionLike = None):
        return lax.platform_dependent(*args, cpu=call, default=functools.partial(reference, precision=precision))

    run.__name__ = run.__qualname__ = target
    return run
