"""GPT2Config <-> the ModelConfig protobuf that the sharder sends and the router serves."""

from __future__ import annotations

from services.common.gpt2.config import GPT2Config
from services.common.pb import common_pb2


def model_config_from_pb(config: common_pb2.ModelConfig) -> GPT2Config:
    """An unset epsilon (proto3 zero) reads as GPT-2's default 1e-5."""
    return GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        layer_norm_epsilon=config.layer_norm_epsilon or 1e-5,
    )


def model_config_to_pb(config: GPT2Config) -> common_pb2.ModelConfig:
    return common_pb2.ModelConfig(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        layer_norm_epsilon=config.layer_norm_epsilon,
    )
