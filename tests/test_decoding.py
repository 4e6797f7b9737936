"""Generation: greedy, sampling, beam search, against brute force and against each other."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import decoding
from seqjax.models import DecoderLM, LMStep, TransformerConfig, lm_state

V = 5


def bigram_step(state, tokens):
    """A toy model whose next-token logits depend on the last token only: `table[token]`. The state also counts
    the tokens it has read per sequence ([B]), so beam search's reordering of the state is exercised."""
    logits = state["table"][tokens]  # [B, T, V]
    return logits, {"table": state["table"], "seen": state["seen"] + tokens.shape[1]}


def bigram_batch_axes(state):
    return {"table": None, "seen": 0}


def _bigram(rng, batch=3):
    table = 2.0 * jax.random.normal(rng, (V, V))
    return {"table": table, "seen": jnp.zeros((batch,), jnp.int32)}


def _score(table, prompt_last, seq, alpha=0.0, eos_id=None):
    """Brute-force reference: log-probability of `seq` after `prompt_last`, and its length (up to eos)."""
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
    total, prev, length = 0.0, prompt_last, 0
    for tok in seq:
        total += logp[prev, tok]
        length += 1
        prev = tok
        if eos_id is not None and tok == eos_id:
            break
    return total / ((5.0 + length) / 6.0) ** alpha, seq[:length]


def test_greedy_matches_argmax_chain(rng):
    state = _bigram(rng)
    prompt = jnp.array([[1, 2], [0, 4], [3, 3]])
    out = decoding.greedy(bigram_step, state, prompt, 6)
    table = np.asarray(state["table"])
    for b in range(3):
        prev, ref = int(prompt[b, -1]), []
        for _ in range(6):
            prev = int(np.argmax(table[prev]))
            ref.append(prev)
        np.testing.assert_array_equal(out[b], ref)


def test_greedy_pads_after_eos(rng):
    table = jnp.full((V, V), -5.0).at[1, 2].set(5.0).at[2, 3].set(5.0).at[3, 1].set(5.0)  # 1 -> 2 -> 3 -> 1
    state = {"table": table, "seen": jnp.zeros((1,), jnp.int32)}
    out = decoding.greedy(bigram_step, state, jnp.array([[1]]), 6, eos_id=3, pad_id=0)
    np.testing.assert_array_equal(out, [[2, 3, 0, 0, 0, 0]])


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_equals_brute_force(rng, alpha):
    state = _bigram(rng, batch=2)
    prompt = jnp.array([[1], [4]])
    n, k = 3, V**2  # K >= V**(n-1) keeps every prefix, so beam search is exact
    tokens, scores = decoding.beam_search(
        bigram_step, state, prompt, n, beam_size=k, alpha=alpha, batch_axes=bigram_batch_axes
    )
    table = np.asarray(state["table"])
    for b in range(2):
        ranked = sorted(
            (_score(table, int(prompt[b, -1]), seq, alpha)[0], seq) for seq in itertools.product(range(V), repeat=n)
        )[::-1]
        np.testing.assert_array_equal(tokens[b, 0], ranked[0][1])
        np.testing.assert_allclose(scores[b, :5], [s for s, _ in ranked[:5]], rtol=1e-5)


def test_beam_search_with_eos_matches_brute_force(rng):
    state = _bigram(jax.random.fold_in(rng, 3), batch=1)
    eos, n, alpha = 2, 3, 0.6
    tokens, scores = decoding.beam_search(
        bigram_step, state, jnp.array([[0]]), n, beam_size=V**2, alpha=alpha, eos_id=eos, batch_axes=bigram_batch_axes
    )
    table = np.asarray(state["table"])
    best = {}
    for seq in itertools.product(range(V), repeat=n):
        score, prefix = _score(table, 0, seq, alpha, eos_id=eos)
        best[prefix] = score  # sequences that end at eos are one hypothesis, padded after it
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    got = [int(t) for t in tokens[0, 0]]
    want = list(ranked[0][0]) + [0] * (n - len(ranked[0][0]))
    assert got == want
    np.testing.assert_allclose(scores[0, 0], ranked[0][1], rtol=1e-5)


def test_beam_one_equals_greedy(rng):
    state = _bigram(rng)
    prompt = jnp.array([[1, 2], [0, 4], [3, 3]])
    greedy = decoding.greedy(bigram_step, state, prompt, 7, eos_id=1)
    # With eos, beam 1 is greedy under raw log-probabilities (alpha = 0): a length penalty may prefer a longer
    # unfinished beam over the finished one, which greedy never considers.
    beam, _ = decoding.beam_search(
        bigram_step, state, prompt, 7, beam_size=1, eos_id=1, alpha=0.0, batch_axes=bigram_batch_axes
    )
    np.testing.assert_array_equal(beam[:, 0], greedy)


def trigram_step(state, tokens):
    """Next-token logits `table[x_{t-1}, x_t]`, where x_{t-1} of the first token read comes from the state
    (`prev` [B]): the model's output depends on its state, so a beam given another beam's state scores wrong."""
    history = jnp.concatenate([state["prev"][:, None], tokens], axis=1)  # [B, T + 1]
    logits = state["table"][history[:, :-1], history[:, 1:]]  # [B, T, V]
    return logits, {"table": state["table"], "prev": tokens[:, -1]}


def trigram_batch_axes(state):
    return {"table": None, "prev": 0}


def _trigram_log_prob(table, context, seq):
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
    (a, b), total = context, 0.0
    for tok in seq:
        total += logp[a, b, tok]
        a, b = b, tok
    return total


def test_beam_search_reorders_the_state(rng):
    """Beams are chosen from different parents at every step; each keeps its parent's state. With a model whose
    logits depend on that state, every returned beam's score is its own sequence's exact log-probability, and a
    beam wide enough to keep every prefix finds the brute-force best sequences."""
    table = 2.0 * jax.random.normal(rng, (V, V, V))
    prompt = jnp.array([[1, 2], [0, 4], [3, 3]])
    state = {"table": table, "prev": jnp.zeros((3,), prompt.dtype)}
    np_table = np.asarray(table)
    tokens, scores = decoding.beam_search(
        trigram_step, state, prompt, 5, beam_size=4, alpha=0.0, batch_axes=trigram_batch_axes
    )
    for b in range(3):
        context = tuple(int(t) for t in prompt[b])
        for j in range(4):
            seq = [int(t) for t in tokens[b, j]]
            np.testing.assert_allclose(scores[b, j], _trigram_log_prob(np_table, context, seq), rtol=1e-5)
    n = 3
    tokens, scores = decoding.beam_search(
        trigram_step, state, prompt, n, beam_size=V ** (n - 1), alpha=0.0, batch_axes=trigram_batch_axes
    )
    for b in range(3):
        context = tuple(int(t) for t in prompt[b])
        ranked = sorted(
            itertools.product(range(V), repeat=n), key=lambda seq: -_trigram_log_prob(np_table, context, seq)
        )
        best = [_trigram_log_prob(np_table, context, seq) for seq in ranked[: V ** (n - 1)]]
        np.testing.assert_allclose(scores[b], best, rtol=1e-5)
        assert [int(t) for t in tokens[b, 0]] == list(ranked[0])


def fixed_logits_step(state, tokens):
    """The same logits `state` [V] after any tokens."""
    return jnp.broadcast_to(state, (*tokens.shape, state.shape[-1])), state


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("top_k", [None, 3])
def test_sample_draws_from_softmax_over_temperature(temperature, top_k):
    """20k one-step draws against softmax(logits / T) (restricted to the top k and renormalised), each token's
    frequency within 5 standard errors of its probability; tokens outside the top k never drawn."""
    logits = jnp.array([1.5, -0.5, 0.8, 0.0, -1.2, 0.3], jnp.float32)
    n = 20_000
    out = decoding.sample(
        fixed_logits_step, logits, jnp.zeros((n, 1), jnp.int32), jax.random.key(3), 1, temperature=temperature,
        top_k=top_k,
    )  # fmt: skip
    counts = np.bincount(np.asarray(out[:, 0]), minlength=logits.shape[0])
    scaled = np.asarray(logits, np.float64) / temperature
    if top_k is not None:
        scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
    probs = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
    assert np.all(counts[probs == 0] == 0), counts
    sigma = np.sqrt(probs * (1 - probs) / n)
    np.testing.assert_array_less(np.abs(counts / n - probs), 5 * sigma + 1e-12, err_msg=f"{counts / n} vs {probs}")


def test_filter_logits_against_numpy(rng):
    logits = jax.random.normal(rng, (4, 11))
    top3 = np.asarray(decoding.filter_logits(logits, top_k=3))
    for row, ref in zip(top3, np.asarray(logits), strict=True):
        kept = np.isfinite(row)
        assert kept.sum() == 3 and set(np.flatnonzero(kept)) == set(np.argsort(-ref)[:3])
    nucleus = np.asarray(decoding.filter_logits(logits, top_p=0.7))
    for row, ref in zip(nucleus, np.asarray(logits), strict=True):
        probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
        order = np.argsort(-probs)
        need = int(np.searchsorted(np.cumsum(probs[order]), 0.7) + 1)  # fewest tokens reaching 0.7
        assert set(np.flatnonzero(np.isfinite(row))) == set(order[:need])
    with pytest.raises(ValueError, match="top_p"):
        decoding.filter_logits(logits, top_p=1.5)


def _lm(rng, scan_layers=False):
    cfg = TransformerConfig(
        vocab_size=13, emb_dim=16, num_heads=2, num_layers=2, mlp_dim=32, max_len=16, dropout_rate=0.0,
        attention_dropout_rate=0.0, scan_layers=scan_layers,
    )  # fmt: skip
    model = DecoderLM(cfg)
    prompt = jax.random.randint(rng, (3, 4), 1, 13)
    params = jax.jit(model.init)(rng, prompt)["params"]
    return model, params, prompt


@pytest.mark.slow
def test_transformer_sampling_limits_equal_greedy_and_seed_fixes_output(rng):
    model, params, prompt = _lm(rng)
    step, n = LMStep(model), 8
    state = lm_state(model, params, 3, 4 + n - 1)
    greedy = decoding.greedy(step, state, prompt, n)
    np.testing.assert_array_equal(decoding.sample(step, state, prompt, rng, n, top_k=1), greedy)
    np.testing.assert_array_equal(decoding.sample(step, state, prompt, rng, n, top_p=1e-6), greedy)
    beam, _ = decoding.beam_search(step, state, prompt, n, beam_size=1)
    np.testing.assert_array_equal(beam[:, 0], greedy)
    a = decoding.sample(step, state, prompt, rng, n, temperature=2.0)
    np.testing.assert_array_equal(a, decoding.sample(step, state, prompt, rng, n, temperature=2.0))
    b = decoding.sample(step, state, prompt, jax.random.fold_in(rng, 1), n, temperature=2.0)
    assert not np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_transformer_beam_search_scores_match_full_pass(rng, scan_layers):
    """Scanned layers keep the cache's batch at axis 1: LMStep.batch_axes says so, or beams would mix."""
    model, params, prompt = _lm(rng, scan_layers)
    n, k = 5, 3
    state = lm_state(model, params, 3, 4 + n - 1)
    tokens, scores = decoding.beam_search(LMStep(model), state, prompt, n, beam_size=k, alpha=0.0)
    # Re-score every returned beam with one full forward pass.
    for j in range(k):
        seq = jnp.concatenate([prompt, tokens[:, j]], axis=1)
        logp = jax.nn.log_softmax(model.apply({"params": params}, seq), axis=-1)
        ref = jnp.take_along_axis(logp[:, 3:-1], tokens[:, j, :, None], axis=-1).sum(axis=(1, 2))
        np.testing.assert_allclose(scores[:, j], ref, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)  # best first


def test_bad_arguments(rng):
    state = _bigram(rng)
    with pytest.raises(ValueError, match="prompt must be integer tokens"):
        decoding.greedy(bigram_step, state, jnp.zeros((3,), jnp.int32), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding.greedy(bigram_step, state, jnp.zeros((3, 1), jnp.int32), 0)
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(bigram_step, state, jnp.zeros((3, 1), jnp.int32), rng, 4, temperature=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_lm_through_the_same_functions(rng, cell):
    from seqjax.models.recurrent_lm import RecurrentLM, RecurrentLMConfig, RNNStep, rnn_state

    model = RecurrentLM(RecurrentLMConfig(vocab_size=11, emb_dim=8, hidden_size=16, num_layers=2, cell=cell))
    tokens = jax.random.randint(rng, (3, 9), 0, 11)
    params = jax.jit(model.init)(rng, tokens)["params"]
    full, _ = model.apply({"params": params}, tokens)
    step = jax.jit(RNNStep(model))
    logits, state = step(rnn_state(model, params, 3), tokens[:, :4])  # prefill carries the state forward
    for t in range(4, 9):
        logits, state = step(state, tokens[:, t : t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    state = rnn_state(model, params, 3)
    greedy = decoding.greedy(RNNStep(model), state, tokens[:, :4], 6)
    beam, _ = decoding.beam_search(RNNStep(model), state, tokens[:, :4], 6, beam_size=1)
    np.testing.assert_array_equal(beam[:, 0], greedy)
    np.testing.assert_array_equal(decoding.sample(RNNStep(model), state, tokens[:, :4], rng, 6, top_k=1), greedy)
    beams, scores = decoding.beam_search(RNNStep(model), state, tokens[:, :4], 4, beam_size=3, alpha=0.0)
    seq = jnp.concatenate([tokens[:, :4], beams[:, 1]], axis=1)  # re-score the second beam with a full pass
    logp = jax.nn.log_softmax(model.apply({"params": params}, seq)[0], axis=-1)
    ref = jnp.take_along_axis(logp[:, 3:-1], beams[:, 1, :, None], axis=-1).sum(axis=(1, 2))
    np.testing.assert_allclose(scores[:, 1], ref, rtol=1e-4, atol=1e-4)


def test_beam_search_keeps_a_better_finished_hypothesis():
    # After the prompt: A (0.62), EOS (0.30), B (0.08). A's continuations share 0.5 each and then everything is
    # uniform, so both beams through A end far below the hypothesis that stopped at once.
    pad, eos, a, b, c, p = range(6)
    table = np.full((6, 6), -30.0, np.float32)
    table[p, [a, eos, b]] = np.log([0.62, 0.30, 0.08])
    table[a, [b, c]] = np.log([0.5, 0.5])
    table[b, :] = table[c, :] = np.log(1 / 6)
    state = {"table": jnp.asarray(table), "seen": jnp.zeros((1,), jnp.int32)}
    for alpha in (0.0, 0.6):
        tokens, scores = decoding.beam_search(
            bigram_step, state, jnp.array([[p]]), 3, beam_size=2, alpha=alpha, eos_id=eos, batch_axes=bigram_batch_axes
        )
        np.testing.assert_array_equal(tokens[0, 0], [eos, pad, pad])
        np.testing.assert_allclose(scores[0, 0], np.log(0.30), rtol=1e-5)  # length 1: penalty 1


def test_beam_search_rejects_pad_or_eos_outside_vocabulary(rng):
    state = _bigram(rng)
    for kwargs in (dict(pad_id=-1), dict(pad_id=V), dict(eos_id=V)):
        with pytest.raises(ValueError, match=r"must be token ids in \[0, 5\)"):
            decoding.beam_search(bigram_step, state, jnp.zeros((3, 1), jnp.int32), 2, beam_size=2, **kwargs)


@pytest.mark.slow
def test_cache_too_short_is_an_error(rng):
    model, params, prompt = _lm(rng)
    state = lm_state(model, params, 3, 8)
    for fn in (decoding.greedy, lambda *a: decoding.beam_search(*a, beam_size=2)):
        with pytest.raises(ValueError, match=r"holds 8 positions but prompt \(4\) \+ max_new_tokens \(6\) - 1 = 9"):
            fn(LMStep(model), state, prompt, 6)
    assert decoding.greedy(LMStep(model), state, prompt, 5).shape == (3, 5)  # exactly fits


def test_top_p_one_keeps_everything(rng):
    logits = jax.random.normal(rng, (2, 50000)) * 3
    np.testing.assert_array_equal(decoding.filter_logits(logits, top_p=1.0), logits)
