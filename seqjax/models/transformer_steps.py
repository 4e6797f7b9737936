"""The Transformer models' step functions for `seqjax.decoding` (which knows no model), and the KV-cache helpers
they and the image decoder share.

    step, state = LMStep(model), lm_state(model, params, batch_size, max_decode_len)
    tokens = decoding.greedy(step, state, prompt, max_new_tokens)

A step runs the model with `config.decode=True` on T new tokens and returns their logits and the updated cache
(`DecoderLM`: `LMStep` / `lm_state`; encoder-decoder `Transformer`: `Seq2SeqStep` / `seq2seq_state`, which encodes
the source once). Steps are frozen dataclasses (hashable: static arguments of the compiled loops); the parameters
travel in the state. `capacity(state)` lets the samplers check the cache is long enough before anything runs, and
`batch_axes(state)` tells beam search where each cache leaf keeps its batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
State = Any


def cache_capacity(cache: Any) -> int:
    """Positions a KV cache holds (the length axis of its first `cached_key`)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if getattr(path[-1], "key", None) == "cached_key":
            return leaf.shape[-3]
    raise ValueError("cache_capacity: no cached_key in the cache")


def cache_batch_axes(state: State) -> Any:
    """Where each state leaf keeps its batch: None for parameters (under a "params" key) and scalars (cache
    counters); axis 1 under a scanned "layers" stack (`[L, B, ...]`; a `[L]` counter has none); 0 otherwise."""

    def axis(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "params" in keys or jnp.ndim(leaf) == 0:
            return None
        if "layers" in keys:
            return None if jnp.ndim(leaf) == 1 else 1
        return 0

    return jax.tree_util.tree_map_with_path(axis, state)


def empty_cache(model: nn.Module, *args) -> Any:
    """The "cache" collection `model.init(key, *args)` would create, as zeros, without running the model."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def with_decode(model: nn.Module) -> nn.Module:
    """The model with `config.decode=True` (itself if it already has it)."""
    return model if model.config.decode else model.clone(config=model.config.replace(decode=True))


class CachedStep:
    """What every KV-cache step shares: the model, the capacity check and the batch axes for beam search."""

    model: nn.Module

    def capacity(self, state: State) -> int:
        return cache_capacity(state["cache"])

    def batch_axes(self, state: State) -> Any:
        return cache_batch_axes(state)


def _check_length(model: nn.Module, max_decode_len: int) -> None:
    if max_decode_len > model.config.max_len:
        raise ValueError(f"max_decode_len={max_decode_len} exceeds TransformerConfig.max_len={model.config.max_len}")


@dataclasses.dataclass(frozen=True)
class LMStep(CachedStep):
    """Step function of a `DecoderLM`; the state is `lm_state(...)`: `{"params", "cache"}`."""

    model: nn.Module

    def __call__(self, state: State, tokens: Array) -> tuple[Array, State]:
        logits, new = with_decode(self.model).apply(
            {"params": state["params"], "cache": state["cache"]}, tokens, mutable=["cache"]
        )
        return logits, {"params": state["params"], "cache": new["cache"]}


def lm_state(model: nn.Module, params: Any, batch_size: int, max_decode_len: int) -> State:
    """An empty KV cache for `max_decode_len` positions (prompt + new tokens - 1), with the parameters."""
    _check_length(model, max_decode_len)
    cache = empty_cache(with_decode(model), jnp.zeros((batch_size, max_decode_len), jnp.int32))
    return {"params": params, "cache": cache}


@dataclasses.dataclass(frozen=True)
class Seq2SeqStep(CachedStep):
    """Step function of an encoder-decoder `Transformer` over `seq2seq_state(...)`: `{"params", "cache",
    "encoded", "inputs"}` (the source is encoded once, in `seq2seq_state`)."""

    model: nn.Module

    def __call__(self, state: State, tokens: Array) -> tuple[Array, State]:
        logits, new = with_decode(self.model).apply(
            {"params": state["params"], "cache": state["cache"]},
            state["encoded"],
            state["inputs"],
            tokens,
            mutable=["cache"],
            method="decode",
        )
        return logits, {**state, "cache": new["cache"]}


def seq2seq_state(model: nn.Module, params: Any, inputs: Array, max_decode_len: int) -> State:
    """Encodes `inputs [B, S]` and makes an empty decoder cache for `max_decode_len` target positions."""
    _check_length(model, max_decode_len)
    return _encoded_state(model, params, jnp.asarray(inputs), max_decode_len)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len"))
def _encoded_state(model: nn.Module, params: Any, inputs: Array, max_decode_len: int) -> State:
    # Compiled once per model and shape (equal models hash equal): a sweep's trials share it.
    decoder = with_decode(model)
    encoded = decoder.apply({"params": params}, inputs, method="encode")
    targets = jnp.zeros((inputs.shape[0], max_decode_len), jnp.int32)
    cache = empty_cache(decoder, inputs, targets)
    return {"params": params, "cache": cache, "encoded": encoded, "inputs": inputs}
