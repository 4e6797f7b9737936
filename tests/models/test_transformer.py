"""The Transformer family: causality, padding, cached decoding, scanned = unscanned, remat, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.models import (
    DecoderLM,
    Encoder,
    LMStep,
    Seq2SeqStep,
    Transformer,
    TransformerConfig,
    get_model,
    lm_state,
    seq2seq_state,
    stack_layers,
    unstack_layers,
)

V = 19


def _config(**overrides):
    base = dict(
        vocab_size=V,
        emb_dim=16,
        num_heads=2,
        num_layers=2,
        mlp_dim=32,
        max_len=16,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    return TransformerConfig(**{**base, **overrides})


def _tokens(key, shape):
    return jax.random.randint(key, shape, 1, V)  # 0 is padding


def _init(model, rng, *args):
    return jax.jit(model.init)(rng, *args)["params"]  # jit: an eager init compiles every op on its own (slower)


# ------------------------------------------------------------------------------------------------------------------
# Causality and padding
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_decoder_lm_is_causal_bitwise(rng, scan, implementation):
    cfg = _config(scan_layers=scan, attention_implementation=implementation)
    tokens = _tokens(rng, (3, 12))
    model = DecoderLM(cfg)
    params = _init(model, rng, tokens)
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    base = np.asarray(apply(tokens))
    for t in (0, 5, 10):
        changed = tokens.at[:, t + 1 :].set(_tokens(jax.random.fold_in(rng, t), (3, 11 - t)))
        assert not np.array_equal(changed, tokens)
        out = np.asarray(apply(changed))
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the change is visible later


@pytest.mark.slow
def test_decoder_lm_is_causal_at_blocked_size(rng):
    # Large enough that attention runs the blocked kernel (B*N*T*T > 2**19 elements).
    cfg = _config(emb_dim=32, num_heads=4, num_layers=1, max_len=256)
    tokens = _tokens(rng, (3, 256))
    model = DecoderLM(cfg)
    params = _init(model, rng, tokens[:1, :8])
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    base = np.asarray(apply(tokens))
    changed = tokens.at[:, 100:].set(_tokens(jax.random.fold_in(rng, 1), (3, 156)))
    np.testing.assert_array_equal(np.asarray(apply(changed))[:, :100], base[:, :100])


@pytest.mark.slow
def test_transformer_decoder_is_causal_bitwise(rng):
    cfg = _config()
    inputs, targets = _tokens(rng, (2, 9)), _tokens(jax.random.fold_in(rng, 1), (2, 10))
    model = Transformer(cfg)
    params = _init(model, rng, inputs, targets)
    apply = jax.jit(lambda s, t: model.apply({"params": params}, s, t))
    base = np.asarray(apply(inputs, targets))
    # Teacher forcing shifts right: logits[:, t] sees targets[:, :t], so changing targets[t:] keeps [: t + 1].
    t = 4
    changed = targets.at[:, t:].set(_tokens(jax.random.fold_in(rng, 2), (2, 10 - t)))
    out = np.asarray(apply(inputs, changed))
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.slow
@pytest.mark.parametrize("pre_norm", [True, False])
def test_encoder_padding_does_not_change_real_tokens(rng, pre_norm):
    cfg = _config(pre_norm=pre_norm)
    real = _tokens(rng, (2, 6))
    short = jnp.pad(real, ((0, 0), (0, 1)))  # one pad
    long = jnp.pad(real, ((0, 0), (0, 7)))  # seven pads
    model = Transformer(cfg)
    targets = _tokens(jax.random.fold_in(rng, 1), (2, 5))
    params = _init(model, rng, short, targets)
    enc_short = model.apply({"params": params}, short, method="encode")
    enc_long = model.apply({"params": params}, long, method="encode")
    np.testing.assert_allclose(enc_short[:, :6], enc_long[:, :6], rtol=1e-5, atol=1e-5)
    # The decoder sees only real source tokens too.
    np.testing.assert_allclose(
        model.apply({"params": params}, short, targets), model.apply({"params": params}, long, targets), atol=1e-5
    )
    # And padding really is masked: changing a real token changes the outputs.
    other = model.apply({"params": params}, short.at[:, 0].set(short[:, 0] % (V - 1) + 1), method="encode")
    assert not np.allclose(other[:, 1:6], enc_short[:, 1:6])


# ------------------------------------------------------------------------------------------------------------------
# Cached decoding equals the full pass
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_lm_cached_decoding_equals_full_pass(rng, scan, position):
    cfg = _config(scan_layers=scan, position=position)
    tokens = _tokens(rng, (2, 12))
    model = DecoderLM(cfg)
    params = _init(model, rng, tokens)
    full = model.apply({"params": params}, tokens)
    step = jax.jit(LMStep(model))
    state = lm_state(model, params, 2, 12)
    logits, state = step(state, tokens[:, :5])  # prefill the prompt in one pass
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 12):
        logits, state = step(state, tokens[:, t : t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_seq2seq_cached_decoding_equals_full_pass(rng, scan):
    cfg = _config(scan_layers=scan, pre_norm=False)
    inputs = jnp.pad(_tokens(rng, (2, 7)), ((0, 0), (0, 2)))  # source padding too
    targets = _tokens(jax.random.fold_in(rng, 1), (2, 8))
    model = Transformer(cfg)
    params = _init(model, rng, inputs, targets)
    full = model.apply({"params": params}, inputs, targets)
    fed = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]  # what teacher forcing feeds: start token, then targets
    step = jax.jit(Seq2SeqStep(model))
    state = seq2seq_state(model, params, inputs, 8)
    logits, state = step(state, fed[:, :3])
    np.testing.assert_allclose(logits, full[:, :3], rtol=1e-5, atol=1e-5)
    for t in range(3, 8):
        logits, state = step(state, fed[:, t : t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_rope_gqa_lm_cached_decoding_equals_full_pass(rng, scan, kv_heads):
    """Rotary positions and grouped-query attention (4 query heads, K = 1 or 2): a prompt prefilled in one call,
    then one token per call (`apply({"params", "cache"}, tokens[:, t:t+1], mutable=["cache"])`), gives the full
    pass; the caches hold K heads and no position table or counter exists."""
    cfg = _config(scan_layers=scan, position="rope", rope_base=500.0, num_heads=4, num_kv_heads=kv_heads)
    tokens = _tokens(rng, (2, 12))
    model = DecoderLM(cfg)
    params = _init(model, rng, tokens)
    kernel = params["stack"]["layers" if scan else "layers_0"]["self_attention"]["key"]["kernel"]
    assert kernel.shape[-2:] == (kv_heads, 4) and "positions" not in params["embed"]
    full = model.apply({"params": params}, tokens)
    dec = DecoderLM(cfg.replace(decode=True))
    cache = dec.init(rng, jnp.zeros((2, 12), jnp.int32))["cache"]
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(cache)}
    assert "position_index" not in str(shapes)
    cached = [s for k, s in shapes.items() if "cached_" in k]  # [(L,) B, 12, K, H]
    assert len(cached) == (2 if scan else 4) and all(s[-3:] == (12, kv_heads, 4) for s in cached)
    step = jax.jit(lambda cache, t: dec.apply({"params": params, "cache": cache}, t, mutable=["cache"]))
    logits, new = step(cache, tokens[:, :5])
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 12):
        logits, new = step(new["cache"], tokens[:, t : t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    # The rotation is applied: the same parameters without positions give other logits.
    none = DecoderLM(cfg.replace(position="none")).apply({"params": params}, tokens)
    assert np.abs(np.asarray(none[:, 1:] - full[:, 1:])).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_rope_gqa_seq2seq_cached_decoding_equals_full_pass(rng, scan):
    cfg = _config(scan_layers=scan, position="rope", num_heads=4, num_kv_heads=2)
    inputs = jnp.pad(_tokens(rng, (2, 7)), ((0, 0), (0, 2)))
    targets = _tokens(jax.random.fold_in(rng, 1), (2, 8))
    model = Transformer(cfg)
    params = _init(model, rng, inputs, targets)
    full = model.apply({"params": params}, inputs, targets)
    fed = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    step = jax.jit(Seq2SeqStep(model))
    state = seq2seq_state(model, params, inputs, 8)
    logits, state = step(state, fed[:, :3])
    np.testing.assert_allclose(logits, full[:, :3], rtol=1e-5, atol=1e-5)
    for t in range(3, 8):
        logits, state = step(state, fed[:, t : t + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_decode_rejects_prompt_longer_than_cache_or_max_len(rng):
    cfg = _config()
    model = DecoderLM(cfg)
    params = _init(model, rng, _tokens(rng, (1, 4)))
    state = lm_state(model, params, 1, 6)
    with pytest.raises(ValueError, match="at most 6 positions"):
        LMStep(model)(state, _tokens(rng, (1, 7)))
    with pytest.raises(ValueError, match="max_len=16"):
        lm_state(model, params, 1, 17)
    with pytest.raises(ValueError, match=r"tokens has length 17 > TransformerConfig.max_len=16"):
        model.apply({"params": params}, _tokens(rng, (1, 17)))


# ------------------------------------------------------------------------------------------------------------------
# Layer stacks: scanned = unscanned, remat changes nothing but memory
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decoder_lm", "transformer", "encoder"])
def test_scanned_and_unscanned_compute_the_same(rng, name):
    cfg = _config(num_layers=3, num_decoder_layers=2 if name == "transformer" else None)
    args = (_tokens(rng, (2, 9)),) if name != "transformer" else (_tokens(rng, (2, 9)), _tokens(rng, (2, 7)))
    plain = get_model(name, cfg)
    params = _init(plain, rng, *args)
    scanned = get_model(name, cfg.replace(scan_layers=True))
    stacked = stack_layers(params)
    # Same structure as a scanned init, and the conversion round-trips exactly.
    ref_shapes = jax.tree.map(jnp.shape, _init(scanned, rng, *args))
    assert jax.tree.map(jnp.shape, stacked) == ref_shapes
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), jax.tree.map(np.asarray, dict(params)))
    np.testing.assert_allclose(
        plain.apply({"params": params}, *args), scanned.apply({"params": stacked}, *args), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_changes_nothing_but_memory(rng, scan, policy):
    cfg = _config(scan_layers=scan, dropout_rate=0.1, attention_dropout_rate=0.1)
    tokens = _tokens(rng, (2, 10))
    params = _init(DecoderLM(cfg), rng, tokens)

    def loss(params, cfg):
        logits = DecoderLM(cfg).apply({"params": params}, tokens, deterministic=False, rngs={"dropout": rng})
        return jnp.mean(logits**2)

    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg.replace(remat_policy=policy))))(params)
    np.testing.assert_allclose(value, value_r, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, grads_r)
    # The rematerialised program really recomputes: the backward pass contains the checkpoint.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, cfg.replace(remat_policy=policy))))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.slow
def test_dropout_is_on_only_in_training(rng):
    cfg = _config(dropout_rate=0.3)
    tokens = _tokens(rng, (2, 8))
    model = DecoderLM(cfg)
    params = _init(model, rng, tokens)
    a = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(a, model.apply({"params": params}, tokens))
    b = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": rng})
    c = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.fold_in(rng, 1)})
    assert not np.allclose(a, b) and not np.allclose(b, c)


@pytest.mark.slow
def test_tied_and_shared_embeddings(rng):
    inputs, targets = _tokens(rng, (2, 6)), _tokens(rng, (2, 5))
    tied = _init(Transformer(_config()), rng, inputs, targets)
    assert "logits" not in tied["decoder"]
    untied = _init(Transformer(_config(tie_embeddings=False)), rng, inputs, targets)
    assert untied["decoder"]["logits"]["kernel"].shape == (16, V)
    shared = _init(Transformer(_config(share_embeddings=True)), rng, inputs, targets)
    assert "shared_embedding" in shared
    assert "table" not in shared["encoder"].get("embed", {}) and "table" not in shared["decoder"].get("embed", {})
    other = _init(Transformer(_config(output_vocab_size=7)), rng, inputs, targets)
    assert Transformer(_config(output_vocab_size=7)).apply({"params": other}, inputs, targets).shape == (2, 5, 7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_logits(rng):
    cfg = _config(dtype=jnp.bfloat16)
    tokens = _tokens(rng, (2, 8))
    model = DecoderLM(cfg)
    params = _init(model, rng, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, inter = model.apply({"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"])
    assert logits.dtype == jnp.float32
    ref = DecoderLM(cfg.replace(dtype=jnp.float32)).apply({"params": params}, tokens)
    # Measured: 0.018 at most (logits up to 4); about 3x that.
    np.testing.assert_allclose(logits, ref, atol=0.055, rtol=0)
    # The output layer computes in float32: from the final (bfloat16) hidden state, the tied embedding's logits in
    # float64 agree to float32 precision (a bfloat16 matmul is off by about 1e-2).
    hidden = np.asarray(inter["intermediates"]["ln_final"]["__call__"][0].astype(jnp.bfloat16), np.float64)
    table = np.asarray(params["embed"]["table"]["embedding"], np.float64)
    np.testing.assert_allclose(logits, hidden / np.sqrt(cfg.emb_dim) @ table.T, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Config errors name the field
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_heads=3), "num_heads"),
        (dict(qkv_dim=10, num_heads=4), "num_heads"),
        (dict(remat_policy="sometimes"), "remat_policy"),
        (dict(position="spiral"), "position"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(attention_dropout_rate=-0.1), "attention_dropout_rate"),
        (dict(emb_dim=0), "emb_dim"),
        (dict(activation="swish"), "activation"),
        (dict(attention_implementation="flash"), "attention_implementation"),
        (dict(share_embeddings=True, output_vocab_size=5), "share_embeddings"),
        (dict(num_kv_heads=3), "num_kv_heads"),  # does not divide num_heads=2
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(rope_base=0.0), "rope_base"),
        (dict(position="rope", num_heads=16), "position"),  # head dim 1: rotary pairs need an even one
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"TransformerConfig.{field}"):
        _config(**overrides)


def test_config_is_frozen_and_replace_validates():
    cfg = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_heads = 4
    with pytest.raises(ValueError, match="num_heads"):
        cfg.replace(num_heads=5)


def test_get_model_errors():
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        get_model("gpt", _config())
    with pytest.raises(TypeError, match="TransformerConfig"):
        get_model("transformer", {"vocab_size": 3})
    assert isinstance(get_model("encoder", _config()), Encoder)


@pytest.mark.slow
def test_bfloat16_parameters_under_strict_promotion(rng):
    cfg = _config(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    tokens = _tokens(rng, (2, 8))
    params = _init(DecoderLM(cfg), rng, tokens)
    assert params["stack"]["layers_0"]["self_attention"]["query"]["kernel"].dtype == jnp.bfloat16
    assert params["ln_final"]["scale"].dtype == jnp.float32  # LayerNorm parameters stay float32
    logits = DecoderLM(cfg).apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_decoder_lm_rejects_num_decoder_layers(rng):
    with pytest.raises(ValueError, match="num_decoder_layers=3 is for the encoder-decoder"):
        DecoderLM(_config(num_decoder_layers=3)).init(rng, _tokens(rng, (1, 4)))


# ------------------------------------------------------------------------------------------------------------------
# Packed sequences (segment_ids, positions)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "scan, remat, implementation, position",
    [
        (False, "none", "auto", "learned"),
        (True, "full", "auto", "learned"),
        (False, "none", "blocked", "learned"),
        (False, "none", "reference", "learned"),
        (False, "none", "auto", "rope"),  # rotary + grouped heads: segments hold with K=1 kv heads too
        (True, "none", "blocked", "rope"),
    ],
)
def test_packed_row_gives_each_sequence_its_own_logits(rng, scan, remat, implementation, position):
    """A packed row (seqjax.data.pipeline.pack) through DecoderLM with its segment_ids and positions gives every
    sequence the logits it gets alone, and the loss over packed_lm_targets' weights is the separate runs' loss."""
    from seqjax.data.pipeline import pack, packed_lm_targets

    lengths = (5, 3, 6, 2)  # rows of 9: [5, 3, pad], [6, 2, pad]
    seqs = [np.asarray(_tokens(jax.random.fold_in(rng, i), (n,))) for i, n in enumerate(lengths)]
    packed = pack(seqs, rows=2, length=9)
    assert packed["segment_ids"].tolist() == [[1] * 5 + [2] * 3 + [0], [1] * 6 + [2] * 2 + [0]]
    cfg = _config(scan_layers=scan, remat_policy=remat, attention_implementation=implementation, position=position)
    cfg = cfg.replace(num_kv_heads=1) if position == "rope" else cfg
    model = DecoderLM(cfg)
    params = _init(model, rng, jnp.asarray(packed["tokens"]))
    kw = dict(segment_ids=jnp.asarray(packed["segment_ids"]), positions=jnp.asarray(packed["positions"]))
    logits = np.asarray(jax.jit(lambda t: model.apply({"params": params}, t, **kw))(jnp.asarray(packed["tokens"])))
    where = [(0, 0), (0, 5), (1, 0), (1, 6)]  # (row, start) of each sequence
    alone = [np.asarray(model.apply({"params": params}, jnp.asarray(s)[None]))[0] for s in seqs]
    for (row, start), s, want in zip(where, seqs, alone, strict=True):
        np.testing.assert_allclose(logits[row, start : start + len(s)], want, rtol=1e-5, atol=1e-5)

    labels, weights = packed_lm_targets(packed["tokens"], packed["segment_ids"])
    assert weights.tolist()[0] == [1, 1, 1, 1, 0, 1, 1, 0, 0]  # no target across a boundary, none on padding
    logp = jax.nn.log_softmax(jnp.asarray(logits))
    nll = -jnp.take_along_axis(logp, jnp.asarray(labels)[..., None], axis=-1)[..., 0]
    packed_loss = float(jnp.sum(nll * weights) / jnp.sum(weights))
    alone_nll = [
        -jnp.take_along_axis(jax.nn.log_softmax(a[:-1]), jnp.asarray(s)[1:, None], axis=-1)
        for a, s in zip(alone, seqs, strict=True)
    ]
    np.testing.assert_allclose(packed_loss, float(jnp.mean(jnp.concatenate(alone_nll))), rtol=1e-5)


@pytest.mark.slow
def test_packed_gradients_equal_the_separate_runs(rng):
    """Gradients of the weighted loss over a packed batch equal those of the same sequences run one by one."""
    from seqjax.data.pipeline import pack, packed_lm_targets

    seqs = [np.asarray(_tokens(jax.random.fold_in(rng, i), (n,))) for i, n in enumerate((4, 7, 3))]
    packed = pack(seqs, rows=1, length=16)
    labels, weights = packed_lm_targets(packed["tokens"], packed["segment_ids"])
    model = DecoderLM(_config(position="learned"))
    params = _init(model, rng, jnp.asarray(packed["tokens"]))

    def packed_loss(p):
        logits = model.apply({"params": p}, jnp.asarray(packed["tokens"]),
                             segment_ids=jnp.asarray(packed["segment_ids"]),
                             positions=jnp.asarray(packed["positions"]))  # fmt: skip
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights)

    def separate_loss(p):
        total = 0.0
        for s in seqs:
            logits = model.apply({"params": p}, jnp.asarray(s)[None])[0, :-1]
            total = total - jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(s)[1:, None], -1))
        return total

    (a, ga), (b, gb) = jax.value_and_grad(packed_loss)(params), jax.value_and_grad(separate_loss)(params)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_decode_refuses_segment_ids_and_positions(rng):
    model = DecoderLM(_config(decode=True))
    tokens = _tokens(rng, (1, 4))
    with pytest.raises(ValueError, match="segment_ids"):
        model.init(rng, tokens, segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        model.init(rng, tokens, positions=jnp.arange(4)[None])
