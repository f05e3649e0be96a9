"""Shapes of published checkpoints as `transformer.ModelConfig`s, by their Hugging Face names.

Names match case-insensitively: `get("qwen3-4b")` is `get("Qwen3-4B")`.

The numbers are those of each checkpoint's config.json, so `hf_import.load` of the
checkpoint yields the same config (with the dtypes asked for there). Dtypes here are the
`ModelConfig` defaults; change them with `dataclasses.replace`.
"""

from __future__ import annotations

from mopd_jax.models import transformer

_QWEN3_VOCAB = 151_936
_LLAMA3_VOCAB = 128_256


def _qwen3(embed_dim, num_layers, num_heads, mlp_dim, tie_embeddings):
  return transformer.ModelConfig(
      vocab_size=_QWEN3_VOCAB,
      num_layers=num_layers,
      embed_dim=embed_dim,
      num_heads=num_heads,
      num_kv_heads=8,
      head_dim=128,
      mlp_dim=mlp_dim,
      rope_theta=1_000_000.0,
      norm_eps=1e-6,
      qk_norm=True,
      tie_embeddings=tie_embeddings,
  )


PRESETS = {
    "Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, tie_embeddings=True),
    "Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, tie_embeddings=True),
    "Qwen3-4B": _qwen3(2560, 36, 32, 9728, tie_embeddings=True),
    "Qwen3-8B": _qwen3(4096, 36, 32, 12288, tie_embeddings=False),
    "Qwen3-14B": _qwen3(5120, 40, 40, 17408, tie_embeddings=False),
    "Llama-3.1-8B": transformer.ModelConfig(
        vocab_size=_LLAMA3_VOCAB,
        num_layers=32,
        embed_dim=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        rope_theta=500_000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        rope_scaling=transformer.Llama3RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}


_BY_LOWER_NAME = {name.lower(): config for name, config in PRESETS.items()}


def get(name: str) -> transformer.ModelConfig:
  """The config of the checkpoint `name` (e.g. "Qwen3-4B"; case does not matter)."""
  if name.lower() not in _BY_LOWER_NAME:
    raise ValueError(f"Unknown model preset {name!r}; known: {list(PRESETS)}.")
  return _BY_LOWER_NAME[name.lower()]
