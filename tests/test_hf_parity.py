"""Hugging Face import and export against the transformers implementations.

Tiny random Qwen3, Qwen2.5 and Llama 3.x models are written with `transformers` (float32,
CPU, eager attention) and read with `hf_import`. Logits on padded batches and greedy
continuations from our KV-cache sampler must match transformers; export followed by import
must be exact, and transformers must load the export and give the same logits.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from mopd_jax.models import hf_export
from mopd_jax.models import hf_import
from mopd_jax.models import presets
from mopd_jax.models import transformer as T
from mopd_jax.sampling import Sampler

VOCAB = 97
PAD = 0
SEQ = 300  # positions up to 299: far beyond the Llama model's original context of 64
LENGTHS = (300, 173, 41)
TOLERANCE = 1e-4
_SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    rms_norm_eps=1e-6,
)
# family -> (architecture, extra config.json settings, max_shard_size of save_pretrained).
FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6), None),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6), "40KB"),
    "llama": (
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_theta=10_000.0,
            # With head_dim 16, the rotary wavelengths fall in all three llama3 regimes.
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        None,
    ),
}

_logits = jax.jit(T.logits, static_argnums=0)


def _randomize(model, seed):
  """Varied greedy paths (strong MLPs), non-trivial norm scales and biases."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if name.endswith("norm.weight"):
        param.copy_(1 + 0.2 * noise)
      elif name.endswith(".bias"):
        param.copy_(0.5 * noise)
      else:
        scale = 2.0 if ".mlp." in name else 1.0
        param.copy_(scale * noise / math.sqrt(param.shape[-1]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for seed, (family, (arch, extra, shard_size)) in enumerate(FAMILIES.items()):
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    model = getattr(transformers, arch)(config_cls(**_SHAPES, **extra))
    _randomize(model, seed)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(root / family), safe_serialization=True, **kwargs)
    out[family] = str(root / family)
  return out


def _reference(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager"
  ).eval()


@pytest.fixture(scope="module")
def references(checkpoints):
  return {family: _reference(d) for family, d in checkpoints.items()}


def _load_highest(directory):
  """Imported (config, params); float32 matmuls at full precision, as transformers on CPU
  (GPUs would otherwise use TF32 and miss the tolerance)."""
  config, params = hf_import.load(directory)
  return dataclasses.replace(config, matmul_precision="highest"), params


@pytest.fixture(scope="module")
def imported(checkpoints):
  return {family: _load_highest(d) for family, d in checkpoints.items()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokenizer")
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(
      json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0"})
  )
  (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
  (directory / "spiece.model").write_bytes(b"\x00sentencepiece model bytes\xff")
  (directory / "notes.txt").write_text("not a tokenizer file")
  return str(directory)


@pytest.fixture(scope="module")
def exported(imported, tokenizer_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  out = {}
  for family, (config, params) in imported.items():
    # The Llama export is split into shards of at most 60 kB (an index and several files).
    max_bytes = 60_000 if family == "llama" else 5_000_000_000
    hf_export.save(
        str(root / family),
        config,
        params,
        architecture=FAMILIES[family][0],
        tokenizer_dir=tokenizer_dir,
        max_shard_bytes=max_bytes,
    )
    out[family] = str(root / family)
  return out


def _batch(side):
  tokens = np.random.default_rng(0).integers(1, VOCAB, (len(LENGTHS), SEQ))
  index, lengths = np.arange(SEQ)[None], np.array(LENGTHS)[:, None]
  mask = index < lengths if side == "right" else index >= SEQ - lengths
  return np.where(mask, tokens, PAD), mask


def _hf_logits(model, tokens, mask):
  """Positions count real tokens only, as in our model (left padding starts at 0)."""
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(tokens),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        position_ids=torch.from_numpy(positions),
    )
  return out.logits.numpy()


def _our_logits(config, params, tokens, mask):
  return np.asarray(_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))


def _leaves(params):
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, side, imported, references):
  config, params = imported[family]
  tokens, mask = _batch(side)
  ours = _our_logits(config, params, tokens, mask)
  ref = _hf_logits(references[family], tokens, mask)
  err = np.abs(ours - ref)[mask].max()
  assert err < TOLERANCE, f"{family}, {side} padding: max abs logit error {err}"
  assert np.abs(ref[mask]).max() > 1.0  # the comparison is not between near-zero logits


def test_imported_configs(imported):
  qwen3, qwen2, llama = (imported[f][0] for f in ("qwen3", "qwen2", "llama"))
  assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.tie_embeddings) == (True, False, True)
  assert (qwen2.qk_norm, qwen2.qkv_bias, qwen2.tie_embeddings) == (False, True, False)
  assert (llama.qk_norm, llama.qkv_bias, llama.tie_embeddings) == (False, False, False)
  assert qwen3.rope_theta == 1e6 and llama.rope_theta == 10_000.0
  assert llama.rope_scaling == T.Llama3RopeScaling(8.0, 1.0, 4.0, 64)
  assert (qwen3.vocab_size, qwen3.num_layers, qwen3.head_dim, qwen3.mlp_dim) == (VOCAB, 3, 16, 96)
  assert "lm_head" not in imported["qwen3"][1] and "lm_head" in imported["llama"][1]


def test_llama3_rope_scaling_changes_logits(imported):
  config, params = imported["llama"]
  tokens, mask = _batch("right")
  unscaled = dataclasses.replace(config, rope_scaling=None)
  diff = np.abs(
      _our_logits(config, params, tokens, mask) - _our_logits(unscaled, params, tokens, mask)
  )
  assert diff[mask].max() > 0.1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_decoding_matches_transformers_generate(family, imported, references):
  config, params = imported[family]
  lengths, new_tokens = (12, 5, 9), 32
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, VOCAB, n) for n in lengths]
  width = max(lengths)
  tokens = np.full((len(prompts), width), PAD)
  mask = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):  # left padding
    tokens[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, True
  # The stop id lies outside the vocabulary: like transformers with EOS disabled, every row
  # runs the full 32 tokens.
  sampler = Sampler(
      config, max_new_tokens=new_tokens, stop_ids=(VOCAB,), pad_id=PAD, temperature=0.0
  )
  out = jax.device_get(jax.jit(sampler.__call__)(params, tokens, mask, jax.random.key(0)))
  model = references[family]
  model.generation_config.eos_token_id = None
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(
          torch.from_numpy(prompt[None]),
          attention_mask=torch.ones((1, len(prompt)), dtype=torch.int64),
          do_sample=False,
          max_new_tokens=new_tokens,
          pad_token_id=PAD,
      )[0, len(prompt) :].numpy()
    assert len(ref) == new_tokens
    np.testing.assert_array_equal(out.tokens[row], ref, err_msg=f"{family}, row {row}")
    assert len(set(ref.tolist())) > 4  # a varied continuation, not one repeated token
  assert (out.lengths == new_tokens).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_then_import_is_exact(family, imported, exported):
  config, params = imported[family]
  config2, params2 = _load_highest(exported[family])
  assert config2 == config
  ours, theirs = _leaves(params), _leaves(params2)
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_export_file_layout(exported, tokenizer_dir):
  single = sorted(os.listdir(exported["qwen3"]))
  assert "model.safetensors" in single and hf_import.INDEX_FILE not in single
  with open(os.path.join(exported["llama"], hf_import.INDEX_FILE)) as f:
    index = json.load(f)
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(
      os.path.getsize(os.path.join(exported["llama"], s))
      - hf_import.read_header(os.path.join(exported["llama"], s))[1]
      for s in shards
  )
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "spiece.model"):
    with open(os.path.join(tokenizer_dir, name), "rb") as a:
      with open(os.path.join(exported["llama"], name), "rb") as b:
        assert a.read() == b.read(), name
  assert "notes.txt" not in os.listdir(exported["llama"])
  tok = transformers.AutoTokenizer.from_pretrained(exported["llama"])
  assert tok("w5 w7 w96")["input_ids"] == [5, 7, 96]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_loads_export(family, imported, exported):
  config, params = imported[family]
  tokens, mask = _batch("left")
  ref = _hf_logits(_reference(exported[family]), tokens, mask)
  err = np.abs(_our_logits(config, params, tokens, mask) - ref)[mask].max()
  assert err < TOLERANCE, f"{family}: max abs logit error {err}"


def test_bfloat16_checkpoint_and_export(checkpoints, imported, tmp_path):
  model = _reference(checkpoints["qwen2"]).to(torch.bfloat16)
  model.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
  config, params = imported["qwen2"]
  rounded = {key: value.astype(jnp.bfloat16) for key, value in _leaves(params).items()}
  # bfloat16 tensors read as float32 are exactly the rounded float32 weights.
  _, from_bf16 = hf_import.load(str(tmp_path / "bf16"))
  for key, value in _leaves(from_bf16).items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, rounded[key].astype(np.float32), err_msg=key)
  # Export as bfloat16 and import as bfloat16: the same rounded weights.
  hf_export.save(
      str(tmp_path / "ours"), config, params, architecture="Qwen2ForCausalLM", dtype="bfloat16"
  )
  config2, params2 = hf_import.load(str(tmp_path / "ours"), dtype="bfloat16")
  assert (config2.param_dtype, config2.dtype) == ("bfloat16", "bfloat16")
  for key, value in _leaves(params2).items():
    assert value.dtype == jnp.bfloat16
    np.testing.assert_array_equal(value, rounded[key], err_msg=key)


def _edited_copy(source, target, **changes):
  shutil.copytree(source, target)
  with open(os.path.join(target, "config.json")) as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(target, "config.json"), "w") as f:
    json.dump(config, f)
  return str(target)


def test_import_errors(checkpoints, tmp_path):
  qwen3 = checkpoints["qwen3"]
  with pytest.raises(ValueError, match=r"MistralForCausalLM.*Qwen3ForCausalLM"):
    hf_import.load(_edited_copy(qwen3, tmp_path / "arch", architectures=["MistralForCausalLM"]))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_import.load(str(tmp_path))
  os.makedirs(tmp_path / "config_only")
  shutil.copy(os.path.join(qwen3, "config.json"), tmp_path / "config_only")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_import.load(str(tmp_path / "config_only"))
  sharded = shutil.copytree(checkpoints["qwen2"], tmp_path / "sharded")
  shard = sorted(n for n in os.listdir(sharded) if n.endswith("safetensors"))[1]
  os.remove(sharded / shard)
  with pytest.raises(FileNotFoundError, match=shard):
    hf_import.load(str(sharded))
  wide = _edited_copy(qwen3, tmp_path / "wide", intermediate_size=100)
  with pytest.raises(
      ValueError, match=r"'model.layers.0.mlp.gate_proj.weight'.*\(96, 64\).*\(100, 64\)"
  ):
    hf_import.load(wide)
  with pytest.raises(ValueError, match=r"not use.*model\.layers\.2\.input_layernorm\.weight"):
    hf_import.load(_edited_copy(qwen3, tmp_path / "short", num_hidden_layers=2))
  with pytest.raises(ValueError, match=r"lacks 11 tensors.*model\.layers\.3\.input_layernorm"):
    hf_import.load(_edited_copy(qwen3, tmp_path / "deep", num_hidden_layers=4))
  with pytest.raises(ValueError, match="'yarn'"):
    hf_import.load(
        _edited_copy(qwen3, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    )


def test_export_errors(imported, exported, tmp_path):
  config, params = imported["qwen3"]
  with pytest.raises(ValueError, match=r"LlamaForCausalLM needs qk_norm=False"):
    hf_export.save(str(tmp_path / "a"), config, params, architecture="LlamaForCausalLM")
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    hf_export.save(str(tmp_path / "b"), config, params, architecture="GPT2LMHeadModel")
  with pytest.raises(ValueError, match="already holds weights"):
    hf_export.save(exported["qwen3"], config, params, architecture="Qwen3ForCausalLM")
  with pytest.raises(ValueError, match=r"unexpected \[\('lm_head',\)\]"):
    hf_export.save(
        str(tmp_path / "c"),
        config,
        {**params, "lm_head": params["embedding"].T},
        architecture="Qwen3ForCausalLM",
    )
  with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
    hf_export.save(
        str(tmp_path / "d"),
        config,
        params,
        architecture="Qwen3ForCausalLM",
        tokenizer_dir=str(tmp_path / "missing"),
    )


# (total, non-embedding) parameters in billions as the model cards state them; Llama-3.1-8B
# is the exact published count.
_PUBLISHED = {
    "Qwen3-0.6B": (0.6, 0.44),
    "Qwen3-1.7B": (1.7, 1.4),
    "Qwen3-4B": (4.0, 3.6),
    "Qwen3-8B": (8.2, 6.95),
    "Qwen3-14B": (14.8, 13.2),
}


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_preset_parameter_counts(name):
  config = presets.get(name)
  shapes = jax.eval_shape(lambda: T.init_params(config, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == config.num_params
  if name == "Llama-3.1-8B":
    assert config.num_params == 8_030_261_248
    return
  total, non_embedding = _PUBLISHED[name]
  embedding = config.vocab_size * config.embed_dim * (1 if config.tie_embeddings else 2)
  digits = 2 if non_embedding < 1 or name == "Qwen3-8B" else 1
  assert round(config.num_params / 1e9, 1) == total
  assert round((config.num_params - embedding) / 1e9, digits) == non_embedding


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_preset_config_json_round_trip(name):
  config = presets.get(name)
  arch = "LlamaForCausalLM" if name.startswith("Llama") else "Qwen3ForCausalLM"
  assert hf_import.config_from_hf(hf_export.config_to_hf(config, arch)) == config


def test_preset_names_match_case_insensitively():
  assert presets.get("qwen3-4b") is presets.get("Qwen3-4B")
  assert presets.get("LLAMA-3.1-8B").rope_scaling.factor == 8.0


def test_unknown_preset_lists_names():
  with pytest.raises(ValueError, match=r"'Qwen3-5B'.*Qwen3-0\.6B.*Llama-3\.1-8B"):
    presets.get("Qwen3-5B")


_WITHOUT_TORCH = r"""
import sys
sys.modules["torch"] = None  # any import of torch or transformers now fails
sys.modules["transformers"] = None
import numpy as np
from mopd_jax.models import hf_export, hf_import, presets, transformer
config, params = hf_import.load(sys.argv[1])
logits = transformer.logits(config, params, np.ones((1, 4), np.int32), np.ones((1, 4), bool))
assert logits.shape == (1, 4, config.vocab_size)
hf_export.save(sys.argv[2], config, params, architecture="Qwen3ForCausalLM")
assert hf_import.load(sys.argv[2])[0] == config
assert presets.get("Qwen3-4B").num_params > 0
print("OK")
"""


def test_import_and_export_work_without_torch(checkpoints, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TORCH, checkpoints["qwen3"], str(tmp_path / "out")],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert out.stdout.strip().endswith("OK")
