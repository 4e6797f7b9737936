"""Whole models, each built from one frozen config dataclass; `get_model(name, config)` builds one by name."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from seqjax.models.classical import (
    AutoregressiveModel,
    LatentAutoregressiveModel,
    MarkovModel,
    NaiveModel,
    markov_fit,
    markov_log_likelihood,
    markov_sample,
    predict_ahead,
)
from seqjax.models.image_decoder import ImageDecoderConfig, ImageStep, ImageTokenDecoder, image_prompt, image_state
from seqjax.models.recurrent_lm import RecurrentLM, RecurrentLMConfig, RNNStep, rnn_state
from seqjax.models.transformer import (
    DecoderBlock,
    DecoderLM,
    Encoder,
    EncoderBlock,
    StackConfig,
    Transformer,
    TransformerConfig,
    stack_layers,
    unstack_layers,
)
from seqjax.models.transformer_steps import LMStep, Seq2SeqStep, lm_state, seq2seq_state
from seqjax.models.vit import ViT, ViTConfig, vit_config
from seqjax.models.vqvae import VQVAE, VQVAEConfig

MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "transformer": (Transformer, TransformerConfig),
    "decoder_lm": (DecoderLM, TransformerConfig),
    "encoder": (Encoder, TransformerConfig),
    "recurrent_lm": (RecurrentLM, RecurrentLMConfig),
    "vit": (ViT, ViTConfig),
    "vqvae": (VQVAE, VQVAEConfig),
    "image_decoder": (ImageTokenDecoder, ImageDecoderConfig),
}


def get_model(name: str, config: Any) -> nn.Module:
    """The model registered as `name`, built from `config` (an instance of its config dataclass)."""
    if name not in MODELS:
        raise ValueError(f"get_model: unknown model {name!r}; registered: {sorted(MODELS)}")
    model, config_type = MODELS[name]
    if not isinstance(config, config_type):
        raise TypeError(f"get_model({name!r}) needs a {config_type.__name__}, got {type(config).__name__}")
    return model(config)


__all__ = [
    "MODELS",
    "VQVAE",
    "AutoregressiveModel",
    "DecoderBlock",
    "DecoderLM",
    "Encoder",
    "EncoderBlock",
    "ImageDecoderConfig",
    "ImageStep",
    "ImageTokenDecoder",
    "LMStep",
    "LatentAutoregressiveModel",
    "MarkovModel",
    "NaiveModel",
    "RNNStep",
    "RecurrentLM",
    "RecurrentLMConfig",
    "Seq2SeqStep",
    "StackConfig",
    "Transformer",
    "TransformerConfig",
    "VQVAEConfig",
    "ViT",
    "ViTConfig",
    "get_model",
    "image_prompt",
    "image_state",
    "lm_state",
    "markov_fit",
    "markov_log_likelihood",
    "markov_sample",
    "predict_ahead",
    "rnn_state",
    "seq2seq_state",
    "stack_layers",
    "unstack_layers",
    "vit_config",
]
