"""Training from Hugging Face checkpoints: a tiny Qwen3 student, an external tiny Qwen3
teacher with the same vocabulary, the HF tokenizer's chat template; start-up errors."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers_lib = pytest.importorskip("tokenizers")

from mopd_jax import settings, train  # noqa: E402
from mopd_jax.data import demo_problems  # noqa: E402
from mopd_jax.metrics import read_jsonl  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A ChatML template of our own (system message optional, generation prompt).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_tokenizer(directory):
  tok = tokenizers_lib.Tokenizer(tokenizers_lib.models.BPE())
  tok.pre_tokenizer = tokenizers_lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers_lib.decoders.ByteLevel()
  trainer = tokenizers_lib.trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=tokenizers_lib.pre_tokenizers.ByteLevel.alphabet())
  texts = [demo_problems.get_problem(i).prompt for i in range(0, 3000, 7)]
  texts += [demo_problems.get_problem(i).solution for i in range(0, 3000, 7)]
  tok.train_from_iterator(texts, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                tok.token_to_id("<|endoftext|>")]}, f)
  return tok.get_vocab_size()


def _write_qwen3(directory, vocab, layers, hidden, tokenizer_dir=None, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=hidden,
                                 num_hidden_layers=layers, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16,
                                 intermediate_size=2 * hidden, tie_word_embeddings=True)
  transformers.Qwen3ForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
  if tokenizer_dir:
    for name in os.listdir(tokenizer_dir):
      with open(os.path.join(tokenizer_dir, name), "rb") as src, \
           open(os.path.join(directory, name), "wb") as dst:
        dst.write(src.read())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  vocab = _write_tokenizer(str(root / "tok"))
  _write_qwen3(str(root / "student"), vocab, 2, 32, str(root / "tok"))
  _write_qwen3(str(root / "teacher"), vocab, 3, 48, seed=1)
  _write_qwen3(str(root / "other_vocab"), vocab + 16, 2, 32, seed=2)
  return root


def _config(root, **overrides):
  settings = {"model.checkpoint": str(root / "student"), "data.cache_dir": str(root / "data"),
              "data.max_prompt_len": 64, "eval.num_prompts": 4, "total_steps": 2}
  settings.update(overrides)
  return tiny_config(None, **settings)


@pytest.mark.slow
def test_external_teacher_run_from_hf_checkpoints(checkpoints, tmp_path):
  config = _config(checkpoints, **{"teacher.mode": "external",
                                   "teacher.checkpoint": str(checkpoints / "teacher"),
                                   "teacher.param_dtype": "float32"})
  s = train.setup(config)
  assert s.step_cfg.teacher_model.num_layers == 3 and s.model_cfg.num_layers == 2
  assert s.tokenizer.stop_ids[0] == s.tokenizer.eos_id
  summary = train.run(config, str(tmp_path))
  assert summary["steps"] == 2
  rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in r]
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  # The prompts went through the checkpoint's own chat template.
  first = s.train_batches.split.prompts[0]
  assert s.tokenizer.decode(first).startswith("<|im_start|>user\n")


def test_teacher_vocabulary_mismatch_names_both_sizes(checkpoints):
  config = _config(checkpoints, **{"teacher.mode": "external",
                                   "teacher.checkpoint": str(checkpoints / "other_vocab")})
  with pytest.raises(settings.ConfigError) as err:
    train.setup(config)
  student_vocab = json.load(open(checkpoints / "student" / "config.json"))["vocab_size"]
  assert f"{student_vocab + 16} tokens" in str(err.value)
  assert f"({student_vocab} tokens)" in str(err.value)


def test_preset_shape_check_names_the_differences(checkpoints):
  with pytest.raises(settings.ConfigError, match="embed_dim preset=2560 checkpoint=32"):
    train.setup(_config(checkpoints, **{"model.preset": "qwen3-4b"}))


def test_hf_checkpoint_needs_a_data_cache_dir(checkpoints):
  with pytest.raises(settings.ConfigError, match="data.cache_dir is required"):
    train.setup(_config(checkpoints, **{"data.cache_dir": None}))
