"""Custom calls that become their JAX formulation when a program is lowered for `jax.export`.

The C++ kernels' custom call targets have no compatibility guarantee (they are built on the user's machine, keyed by
its CPU), so `jax.export` refuses to serialize them. Whether a program is being exported is only known when it is
lowered (`jax.export.export` traces, then lowers with `for_export=True`; a trace may even be shared with plain
`jit`), so the choice is made there: `portable_under_export(native, portable)` returns a function that stages one
primitive, lowered as `native` (the custom call) on a CPU when the program will run here, and as `portable` (the same
math in JAX ops) when it is exported or lowered for any other platform. `jax.export.export(jax.jit(f))` therefore
works with no flag, on every platform, and `jax.jit(f)` keeps the kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax._src import dispatch
from jax.core import ShapedArray
from jax.extend import core
from jax.interpreters import batching, mlir

_call_p = core.Primitive("seqjax_native_or_portable")
_call_p.multiple_results = True


def portable_under_export(native: Callable, portable: Callable) -> Callable:
    """`call(*arrays)`: `native(*arrays)` where a program is lowered to run on a CPU, `portable(*arrays)` where it is
    lowered by `jax.export` or for another platform. Both take arrays and return the same pytree of arrays."""

    def call(*args):
        tree = jax.tree.structure(jax.eval_shape(portable, *args))
        return jax.tree.unflatten(tree, _call_p.bind(*args, native=native, portable=portable))

    return call


def _flat(fun: Callable) -> Callable:
    return lambda *args: jax.tree.leaves(fun(*args))


def _abstract_eval(*avals, native, portable):
    del native
    out = jax.eval_shape(portable, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals))
    return [ShapedArray(o.shape, o.dtype) for o in jax.tree.leaves(out)]


def _batch(args, dims, *, native, portable):
    # Both branches vmapped (the custom call runs its own `vmap_method`); unbatched operands have dim None.
    axes = tuple(dims)
    outs = _call_p.bind(*args, native=jax.vmap(native, in_axes=axes), portable=jax.vmap(portable, in_axes=axes))
    return outs, [0] * len(outs)


def _lower_cpu(ctx, *args, native, portable):
    fun = portable if ctx.module_context.lowering_parameters.for_export else native
    return mlir.lower_fun(_flat(fun), multiple_results=True)(ctx, *args)


def _lower_other(ctx, *args, native, portable):
    del native
    return mlir.lower_fun(_flat(portable), multiple_results=True)(ctx, *args)


# Outside `jit` the primitive is compiled on its own, so that the lowering rules still choose.
_call_p.def_impl(functools.partial(dispatch.apply_primitive, _call_p))
_call_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[_call_p] = _batch
mlir.register_lowering(_call_p, _lower_other)
mlir.register_lowering(_call_p, _lower_cpu, platform="cpu")
