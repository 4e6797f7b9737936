"""`StackConfig` holds the Transformer block stack's fields once: `TransformerConfig`, `ViTConfig` and
`ImageDecoderConfig` extend it without redeclaring any, and each validates them naming its own class."""

import dataclasses
import inspect

import pytest

from seqjax.models import ImageDecoderConfig, StackConfig, TransformerConfig, ViTConfig
from seqjax.models.transformer import STACK_FIELDS

SUBCLASSES = {
    TransformerConfig: dict(vocab_size=10),
    ViTConfig: dict(num_classes=3, image_size=8, patch_size=4),
    ImageDecoderConfig: dict(text_vocab_size=7, image_vocab_size=11),
}
BAD = [
    ("emb_dim", 0, "must be a positive int"),
    ("num_heads", 0, "must be a positive int"),
    ("num_layers", -1, "must be a positive int"),
    ("mlp_dim", 1.5, "must be a positive int"),
    ("dropout_rate", 1.0, r"must be in \[0, 1\)"),
    ("attention_dropout_rate", -0.1, r"must be in \[0, 1\)"),
    ("remat_policy", "some", "is unknown"),
    ("attention_implementation", "fast", "is unknown"),
]


def test_stack_fields_are_the_fields_of_stack_config():
    assert STACK_FIELDS == tuple(f.name for f in dataclasses.fields(StackConfig))
    assert {"emb_dim", "num_layers", "dropout_rate", "scan_layers", "attention_implementation"} <= set(STACK_FIELDS)


@pytest.mark.parametrize("cls", list(SUBCLASSES), ids=lambda c: c.__name__)
def test_each_config_inherits_the_stack_fields_without_redeclaring_them(cls):
    assert issubclass(cls, StackConfig)
    assert not set(STACK_FIELDS) & set(inspect.get_annotations(cls))  # declared in StackConfig only
    base = {f.name: f for f in dataclasses.fields(StackConfig)}
    for f in dataclasses.fields(cls):
        if f.name in base:
            assert f.default is base[f.name].default and f.kw_only, f.name
    config = cls(**SUBCLASSES[cls])
    assert {n: getattr(config, n) for n in STACK_FIELDS} == {n: f.default for n, f in base.items()}


def test_required_fields_stay_positional():
    assert TransformerConfig(10).vocab_size == 10
    assert ViTConfig(3, image_size=8, patch_size=4).num_classes == 3
    assert ImageDecoderConfig(7, 11).image_vocab_size == 11


@pytest.mark.parametrize("cls", list(SUBCLASSES), ids=lambda c: c.__name__)
@pytest.mark.parametrize(("field", "value", "why"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_stack_field_names_the_concrete_class(cls, field, value, why):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field}.*{why}"):
        cls(**SUBCLASSES[cls], **{field: value})
