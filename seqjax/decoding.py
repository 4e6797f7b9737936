"""Autoregressive generation: greedy, sampling (temperature, top-k, top-p) and beam search.

One interface covers every model with a cache or a carried state: a **step function**

    step(state, tokens [B, T] int) -> (logits [B, T, V], state)

that reads T new tokens, returns their next-token logits and the updated state. The prompt `[B, P]` is read in one
call (prefill), then one token per call. `state` is any pytree: a Transformer's KV cache with its parameters
(`seqjax.models.LMStep` / `lm_state`, `Seq2SeqStep` / `seq2seq_state`), or a recurrent model's carry (`RNNStep` /
`rnn_state`); this module knows no model. Steps must be hashable (they are static arguments of the jit-compiled
loops): use a module-level function or a frozen dataclass, and keep arrays (parameters included) in `state`.

All functions return only the new tokens, `[B, max_new_tokens]` (beam search: `[B, K, max_new_tokens]`); after a
sequence emits `eos_id`, its later tokens are `pad_id` (which a model may also generate: compare positions with the
eos position, not with pad, to find where a sequence ends). The state must hold room for P + max_new_tokens - 1
tokens; steps with a `capacity(state)` method get that checked before anything runs. All sequences of a batch share
one prompt length (no padding mask in the cached path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
State = Any
StepFn = Callable[[State, Array], tuple[Array, State]]


# ------------------------------------------------------------------------------------------------------------------
# Greedy and sampling
# ------------------------------------------------------------------------------------------------------------------


def _check(prompt: Array, max_new_tokens: int, step: StepFn | None = None, state: State = None) -> Array:
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer tokens [B, P] with P >= 1, got {prompt.shape} {prompt.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    capacity = getattr(step, "capacity", None)
    if capacity is not None:  # a cache cannot grow: past its end, writes would clamp and logits go wrong silently
        need, room = prompt.shape[1] + max_new_tokens - 1, capacity(state)
        if need > room:
            raise ValueError(
                f"the state holds {room} positions but prompt ({prompt.shape[1]}) + max_new_tokens "
                f"({max_new_tokens}) - 1 = {need}; make the cache longer"
            )
    return prompt


def _generate(step, state, prompt, max_new_tokens, choose, eos_id, pad_id):
    """Prefill, then `max_new_tokens - 1` single-token steps; `choose(logits [B, V], i) -> tokens [B]`."""
    logits, state = step(state, prompt)
    first = choose(logits[:, -1].astype(jnp.float32), 0)
    done = jnp.zeros(first.shape, bool) if eos_id is None else first == eos_id

    def body(carry, i):
        state, token, done = carry
        logits, state = step(state, token[:, None])
        new = choose(logits[:, 0].astype(jnp.float32), i)
        new = jnp.where(done, pad_id, new).astype(token.dtype)
        if eos_id is not None:
            done = done | (new == eos_id)
        return (state, new, done), new

    _, rest = lax.scan(body, (state, first.astype(prompt.dtype), done), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None].astype(prompt.dtype), rest.T], axis=1)  # [B, max_new_tokens]


@functools.partial(jax.jit, static_argnames=("step", "max_new_tokens", "eos_id", "pad_id"))
def greedy(
    step: StepFn, state: State, prompt: Array, max_new_tokens: int, *, eos_id: int | None = None, pad_id: int = 0
) -> Array:
    """The most likely token at each step: `[B, max_new_tokens]`."""
    prompt = _check(prompt, max_new_tokens, step, state)
    return _generate(step, state, prompt, max_new_tokens, lambda logits, i: jnp.argmax(logits, -1), eos_id, pad_id)


def filter_logits(logits: Array, *, top_k: int | None = None, top_p: float | None = None) -> Array:
    """Sets to -inf every logit outside the top k and outside the nucleus: the fewest most likely tokens whose
    probability reaches `top_p` (the most likely token always stays, so `top_p -> 0` is greedy). `[..., V]`."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None:
        if not 1 <= top_k:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if top_p >= 1.0:  # keep everything (a float32 cumulative sum can reach 1 before the last token)
            return logits
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
        keep_sorted = (before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)  # back to vocabulary order
        logits = jnp.where(keep, logits, neg)
    return logits


@functools.partial(
    jax.jit, static_argnames=("step", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id")
)
def sample(
    step: StepFn,
    state: State,
    prompt: Array,
    rng: Array,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Array:
    """Samples from softmax(logits / temperature), optionally restricted to the top k and to the nucleus top_p.
    The key of step i is `fold_in(rng, i)`, so a fixed `rng` gives fixed tokens. `[B, max_new_tokens]`."""
    prompt = _check(prompt, max_new_tokens, step, state)
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0 (use greedy for the argmax), got {temperature}")

    def choose(logits, i):
        logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)

    return _generate(step, state, prompt, max_new_tokens, choose, eos_id, pad_id)


# ------------------------------------------------------------------------------------------------------------------
# Beam search
# ------------------------------------------------------------------------------------------------------------------


def default_batch_axes(state: State) -> Any:
    """Where each state leaf keeps its batch, for steps without a `batch_axes` method: None for parameters (under a
    "params" key) and scalars, axis 0 for every other leaf."""

    def axis(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return None if "params" in keys or jnp.ndim(leaf) == 0 else 0

    return jax.tree_util.tree_map_with_path(axis, state)


def _map_batch(fn, state, axes):
    return jax.tree.map(lambda x, a: x if a is None else fn(x, a), state, axes)


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ** alpha; scores are divided by it (alpha = 0: raw log-probability)."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


@functools.partial(
    jax.jit, static_argnames=("step", "max_new_tokens", "beam_size", "alpha", "eos_id", "pad_id", "batch_axes")
)
def beam_search(
    step: StepFn,
    state: State,
    prompt: Array,
    max_new_tokens: int,
    *,
    beam_size: int,
    alpha: float = 0.6,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_axes: Any = None,
) -> tuple[Array, Array]:
    """Beam search with separate pools, as in Wu et al. 2016 and flax's WMT example: `beam_size` alive beams (no
    eos yet) and the `beam_size` best finished hypotheses (ended by `eos_id`, padded with `pad_id` after it), ranked
    by log-probability divided by `length_penalty` (length counted up to and including eos). Every step extends the
    alive beams, moves new eos hypotheses to the finished pool and keeps the best non-eos ones alive; at the end,
    unfinished beams compete with the finished ones at full length.

    `batch_axes`: a function state -> pytree of batch axes, used to copy the state to every beam and to reorder it
    as beams are chosen; None: the step's own `batch_axes` method if it has one, else `default_batch_axes`.

    Returns:
      tokens `[B, K, max_new_tokens]` and scores `[B, K]` (normalised log-probabilities), best first.
    """
    prompt = _check(prompt, max_new_tokens, step, state)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    b, k, n = prompt.shape[0], beam_size, max_new_tokens
    logits, state = step(state, prompt)
    v = logits.shape[-1]
    if not 0 <= pad_id < v or (eos_id is not None and not 0 <= eos_id < v):
        raise ValueError(f"pad_id ({pad_id}) and eos_id ({eos_id}) must be token ids in [0, {v})")
    axes = (batch_axes or getattr(step, "batch_axes", None) or default_batch_axes)(state)
    state = _map_batch(lambda x, a: jnp.repeat(x, k, axis=a), state, axes)  # [B*K] along each batch axis
    neg = jnp.float32(-jnp.inf)
    kk = min(2 * k, k * v)  # candidates per step: enough that k stay alive even if k of them end

    def expand(i, logp, alive, finished, state):
        scores, tokens = alive  # [B, K], [B, K, n]
        total = (scores[..., None] + logp).reshape(b, k * v)  # all alive beams have length i + 1 now
        top, flat = lax.top_k(total, kk)  # [B, 2K]
        beam, token = flat // v, (flat % v).astype(tokens.dtype)
        cand = jnp.take_along_axis(tokens, beam[..., None], axis=1).at[:, :, i].set(token)  # [B, 2K, n]
        ends = (token == eos_id) if eos_id is not None else jnp.zeros(token.shape, bool)
        # Alive: the best K candidates that did not end.
        alive_top, pick = lax.top_k(jnp.where(ends, neg, top), k)
        alive = (alive_top, jnp.take_along_axis(cand, pick[..., None], axis=1))
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(beam, pick, axis=1)).reshape(-1)
        state = _map_batch(lambda x, a: jnp.take(x, rows, axis=a), state, axes)
        # Finished: the best K of the old pool and the candidates that ended here.
        fin_scores, fin_tokens = finished
        new = jnp.where(ends, top / length_penalty(jnp.full(top.shape, i + 1), alpha), neg)
        pool_scores = jnp.concatenate([fin_scores, new], axis=1)  # [B, 3K]
        pool_tokens = jnp.concatenate([fin_tokens, cand], axis=1)
        fin_scores, best = lax.top_k(pool_scores, k)
        finished = (fin_scores, jnp.take_along_axis(pool_tokens, best[..., None], axis=1))
        return alive, finished, state

    # Beam 0 starts with score 0 and the others with -inf, so the first step draws distinct tokens from beam 0.
    empty = jnp.full((b, k, n), pad_id, prompt.dtype)
    alive = (jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg), (b, 1)), empty)
    finished = (jnp.full((b, k), neg), empty)
    logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))  # [B, V]
    alive, finished, state = expand(0, jnp.repeat(logp[:, None], k, axis=1), alive, finished, state)

    def body(carry, i):
        alive, finished, state = carry
        logits, state = step(state, alive[1][:, :, i - 1].reshape(b * k, 1))
        logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)).reshape(b, k, v)
        return expand(i, logp, alive, finished, state), None

    (alive, finished, state), _ = lax.scan(body, (alive, finished, state), jnp.arange(1, n))
    # Unfinished beams, at full length, compete with the finished ones.
    scores = jnp.concatenate([finished[0], alive[0] / length_penalty(jnp.full(alive[0].shape, n), alpha)], axis=1)
    tokens = jnp.concatenate([finished[1], alive[1]], axis=1)
    scores, best = lax.top_k(scores, k)
    return jnp.take_along_axis(tokens, best[..., None], axis=1), scores
