"""HFTokenizer and chat templates against transformers on small locally built tokenizers."""

import datetime
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

hf_tokenizers = pytest.importorskip("tokenizers")
jinja2 = pytest.importorskip("jinja2")
transformers = pytest.importorskip("transformers")

from mopd_jax import hf_tokenizer, tokenizers  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
LLAMA_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# ChatML with a Qwen3-like thinking switch: an optional system turn (with tool schemas), user and
# assistant turns (earlier reasoning dropped from assistant turns) and the generation prompt.
QWEN_STYLE_TEMPLATE = r"""
{%- if messages[0].role == 'system' %}
  {%- set system_text = messages[0].content %}
  {%- set turns = messages[1:] %}
{%- else %}
  {%- set turns = messages %}
{%- endif %}
{%- if system_text is defined or tools %}
  {{- '<|im_start|>system\n' }}
  {%- if system_text is defined %}{{ system_text }}{% endif %}
  {%- if tools %}
    {{- '\n\nTools you may call:' }}
    {%- for tool in tools %}{{ '\n' + tool | tojson }}{% endfor %}
  {%- endif %}
  {{- '<|im_end|>\n' }}
{%- endif %}
{%- for message in turns %}
  {%- if message.role == 'system' %}
    {{- raise_exception('Only the first message may be a system message.') }}
  {%- elif message.role == 'assistant' %}
    {%- set answer = message.content.split('</think>')[-1].lstrip('\n') %}
    {{- '<|im_start|>assistant\n' }}{% generation %}{{ answer + '<|im_end|>' }}{% endgeneration %}
    {{- '\n' }}
  {%- else %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and not enable_thinking %}
    {{- '<think>\n\n</think>\n\n' }}
  {%- endif %}
{%- endif %}
"""

# Llama 3 headers: bos, a dated system turn, trimmed message contents and the generation prompt.
LLAMA_STYLE_TEMPLATE = r"""
{{- bos_token }}
{%- if date_string is not defined %}
  {%- set date_string = strftime_now('%d %b %Y') %}
{%- endif %}
{%- if messages[0].role == 'system' %}
  {%- set system_text = messages[0].content | trim %}
  {%- set messages = messages[1:] %}
{%- else %}
  {%- set system_text = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Today Date: ' + date_string + '\n\n' + system_text + '<|eot_id|>' }}
{%- for message in messages %}
  {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' }}
  {{- message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

TEXTS = (
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand   runs   of spaces",
    "Café crème, naïve façade, Ærøskøbing, Straße",
    "你好，世界！机器学习很有趣。",
    "日本語のテキストと한국어 텍스트",
    "emoji 🚀🎉👩‍💻 and flags 🇫🇷",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "if (x != 0) { y = 1 / x; } else { y = 0; }",
    "unseen: Ωμέγα ∑∫√ 🦀 ℵ₀",
    "3.14159 2.71828 1e-9 0x1F",
    "",
    " ",
    "\n",
)
SPECIAL_TEXTS = (
    "<|im_start|>user\nhi<|im_end|>\n",
    "<think>\nreasoning\n</think>\n\nanswer",
    "text <|endoftext|> more text",
)


def _corpus():
  rng = random.Random(0)
  words = (
      "the quick brown fox jumps over lazy dog solution answer question test code python "
      "return value function loop prime number sum list string café naïve résumé façade "
      "über größe niño año 你好 世界 学习 数学 答案 問題 日本語 한국어 🚀 🎉 ✅ 😀 ∑ √ π"
  ).split()
  lines = []
  for i in range(300):
    sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
    lines.append(f"{sentence.capitalize()}. ({i})")
    if i % 3 == 0:
      lines.append(f"def f{i}(x):\n    return x * {i} + {rng.randint(0, 99)}\n")
  return lines


def _train_backend():
  backend = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  backend.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=1000,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  backend.train_from_iterator(_corpus(), trainer)
  backend.add_special_tokens(
      [hf_tokenizers.AddedToken(t, special=True, normalized=False) for t in QWEN_TOKENS]
  )
  backend.add_tokens(
      [hf_tokenizers.AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS]
  )
  return backend


def _write_json(directory, name, value):
  with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False, indent=1)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """Qwen3-like: special tokens and template in tokenizer_config.json, two eos ids."""
  directory = str(tmp_path_factory.mktemp("qwen_style"))
  backend = _train_backend()
  backend.save(os.path.join(directory, "tokenizer.json"))
  ids = {t: backend.token_to_id(t) for t in QWEN_TOKENS}
  _write_json(
      directory,
      "tokenizer_config.json",
      {
          "tokenizer_class": "PreTrainedTokenizerFast",
          "bos_token": None,
          "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>",
          "model_max_length": 4096,
          "chat_template": QWEN_STYLE_TEMPLATE,
      },
  )
  _write_json(
      directory,
      "generation_config.json",
      {
          "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
          "pad_token_id": ids["<|endoftext|>"],
      },
  )
  return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """Llama-3-like: tokens in special_tokens_map.json, template in chat_template.jinja, no pad."""
  directory = str(tmp_path_factory.mktemp("llama_style"))
  backend = _train_backend()
  backend.add_special_tokens(
      [hf_tokenizers.AddedToken(t, special=True, normalized=False) for t in LLAMA_TOKENS]
  )
  backend.save(os.path.join(directory, "tokenizer.json"))
  _write_json(directory, "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
  _write_json(
      directory,
      "special_tokens_map.json",
      {
          "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "rstrip": False},
          "eos_token": "<|eot_id|>",
      },
  )
  with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
    f.write(LLAMA_STYLE_TEMPLATE)
  _write_json(
      directory,
      "generation_config.json",
      {
          "bos_token_id": backend.token_to_id("<|begin_of_text|>"),
          "eos_token_id": [
              backend.token_to_id("<|eot_id|>"),
              backend.token_to_id("<|end_of_text|>"),
          ],
      },
  )
  return directory


@pytest.fixture(scope="module", params=["qwen", "llama"])
def pair(request):
  """(ours, transformers, fixed template kwargs) loaded from the same directory."""
  directory = request.getfixturevalue(f"{request.param}_dir")
  return (
      hf_tokenizer.HFTokenizer(directory),
      transformers.AutoTokenizer.from_pretrained(directory),
      {"date_string": "26 Jul 2024"} if request.param == "llama" else {},
  )


def _variant(directory, source_dir, config, generation_config=None, files=()):
  """An HFTokenizer on the vocabulary of `source_dir` with other configuration files."""
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  shutil.copy(os.path.join(source_dir, "tokenizer.json"), directory)
  _write_json(directory, "tokenizer_config.json", config)
  if generation_config is not None:
    _write_json(directory, "generation_config.json", generation_config)
  for name, text in dict(files).items():
    os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.write(text)
  return hf_tokenizer.HFTokenizer(str(directory))


def _hf_render(hf, messages, **kwargs):
  return hf.apply_chat_template(messages, tokenize=False, **kwargs)


def test_encode_and_decode_match_transformers(pair):
  ours, hf, _ = pair
  for text in TEXTS + SPECIAL_TEXTS:
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False), text
    padded = ids + [ours.eos_id, ours.pad_id, ours.pad_id]
    kept = [i for i in padded if i not in {ours.pad_id, *ours.stop_ids}]
    for skip in (False, True):
      assert ours.decode(padded, skip_special_tokens=skip) == hf.decode(
          kept, skip_special_tokens=skip
      )
    assert ours.decode(padded, skip_special_tokens=True) == hf.decode(
        padded, skip_special_tokens=True
    )
  for text in TEXTS:
    assert ours.decode(np.asarray(ours.encode(text) + [ours.eos_id], np.int32)) == text
  assert ours.decode(ours.encode(SPECIAL_TEXTS[1])) == SPECIAL_TEXTS[1]  # <think> is not special.


def test_special_ids_and_vocab_size(qwen_dir, llama_dir):
  qwen = hf_tokenizer.HFTokenizer(qwen_dir)
  hf_qwen = transformers.AutoTokenizer.from_pretrained(qwen_dir)
  im_end, endoftext = qwen.token_id("<|im_end|>"), qwen.token_id("<|endoftext|>")
  assert (qwen.eos_id, qwen.stop_ids) == (im_end, (im_end, endoftext))
  assert (qwen.eos_id, qwen.pad_id) == (hf_qwen.eos_token_id, hf_qwen.pad_token_id)
  assert qwen.vocab_size == len(hf_qwen) == max(hf_qwen.get_vocab().values()) + 1

  llama = hf_tokenizer.HFTokenizer(llama_dir)
  hf_llama = transformers.AutoTokenizer.from_pretrained(llama_dir)
  eot, end_of_text = llama.token_id("<|eot_id|>"), llama.token_id("<|end_of_text|>")
  assert llama.stop_ids == (eot, end_of_text) and llama.eos_id == hf_llama.eos_token_id == eot
  assert hf_llama.pad_token_id is None and llama.pad_id == eot  # Fallback: the eos id.
  assert llama.special_tokens["bos_token"] == hf_llama.bos_token == "<|begin_of_text|>"
  assert llama.vocab_size == len(hf_llama)


CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are a careful assistant. Réponds en français."},
        {"role": "user", "content": "Écris une fonction qui additionne deux nombres."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好！Say hi 🚀"},
        {"role": "assistant", "content": "<think>\nThey greet me.\n</think>\n\nHi! 👋"},
        {"role": "user", "content": "Now write code:\n```python\nprint('ok')\n```"},
    ],
    [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer", "tool_calls": None},
        {"role": "user", "content": "  second question with spaces  \n"},
    ],
)
THINKING_OPTIONS = ({}, {"enable_thinking": True}, {"enable_thinking": False})


def test_qwen_style_chat_template_matches_transformers(qwen_dir):
  ours = hf_tokenizer.HFTokenizer(qwen_dir)
  hf = transformers.AutoTokenizer.from_pretrained(qwen_dir)
  for messages in CONVERSATIONS:
    for add_generation_prompt in (True, False):
      for options in THINKING_OPTIONS:
        kwargs = dict(add_generation_prompt=add_generation_prompt, **options)
        text = tokenizers.apply_chat_template(ours, messages, **kwargs)
        assert text == _hf_render(hf, messages, **kwargs)
        assert ours.encode(text) == hf.apply_chat_template(
            messages, tokenize=True, return_dict=False, **kwargs
        )
  text = tokenizers.apply_chat_template(ours, CONVERSATIONS[2])
  assert "Hi! 👋<|im_end|>" in text and "They greet me" not in text  # Old reasoning dropped.
  text = tokenizers.apply_chat_template(ours, CONVERSATIONS[0], enable_thinking=False)
  assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  tools = [{"name": "lookup", "description": "Cherche un mot — 查找", "parameters": {}}]
  text = tokenizers.apply_chat_template(ours, CONVERSATIONS[1], tools=tools)
  assert text == _hf_render(hf, CONVERSATIONS[1], tools=tools, add_generation_prompt=True)
  assert "Cherche un mot — 查找" in text


def test_llama_style_chat_template_matches_transformers(llama_dir):
  ours = hf_tokenizer.HFTokenizer(llama_dir)
  hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
  for messages in CONVERSATIONS:
    for add_generation_prompt in (True, False):
      kwargs = dict(add_generation_prompt=add_generation_prompt, date_string="26 Jul 2024")
      text = tokenizers.apply_chat_template(ours, messages, **kwargs)
      assert text == _hf_render(hf, messages, **kwargs)
      assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
  text = tokenizers.apply_chat_template(ours, CONVERSATIONS[0])  # Dated by strftime_now.
  assert text == _hf_render(hf, CONVERSATIONS[0], add_generation_prompt=True)
  assert f"{datetime.date.today():%Y}\n\n<|eot_id|>" in text


PROMPT_CASES = (
    dict(user_text="What is 2 + 2?"),
    dict(user_text="Écris du code 🚀\nligne deux", system="Be precise."),
    dict(
        user_text="And now in 中文?",
        system="You translate.",
        history=CONVERSATIONS[2][1:3],
        enable_thinking=False,
    ),
    dict(user_text="def f(x):\n    return x", add_generation_prompt=False),
)


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_insertion_index_in_chat_templates(pair, case):
  ours, hf, fixed = pair
  case = {**case, **fixed}
  user_text = case.pop("user_text")
  ids, index = tokenizers.encode_chat_prompt(ours, user_text, **case)
  system, history = case.pop("system", None), list(case.pop("history", ()))
  messages = ([{"role": "system", "content": system}] if system else []) + history
  messages.append({"role": "user", "content": user_text})
  case.setdefault("add_generation_prompt", True)
  full = _hf_render(hf, messages, **case)
  # The forced token boundary changes nothing here: the tail starts with an added token.
  assert ids == hf.encode(full, add_special_tokens=False)
  assert hf.decode(ids[:index]).endswith(user_text)
  end_of_turn = "<|eot_id|>" if fixed else "<|im_end|>"
  assert hf.convert_ids_to_tokens(ids[index]) == end_of_turn
  # Peer context inserted at the index gives the prompt rendered with it in the user message.
  block = "\nCorrect solution:\n\nprint(4) ✅\n\n\n\nCorrectly solve the original question."
  with_block = ids[:index] + ours.encode(block) + ids[index:]
  messages[-1] = {"role": "user", "content": user_text + block}
  assert hf.decode(with_block) == _hf_render(hf, messages, **case)


def test_trailing_whitespace_and_marker_checks(qwen_dir, llama_dir, tmp_path):
  qwen = hf_tokenizer.HFTokenizer(qwen_dir)
  ids, index = tokenizers.encode_chat_prompt(qwen, "ends with a newline\n")
  assert qwen.decode(ids[:index]).endswith("ends with a newline\n")
  llama = hf_tokenizer.HFTokenizer(llama_dir)
  with pytest.raises(ValueError, match="trims whitespace"):
    tokenizers.encode_chat_prompt(llama, "ends with a newline\n", date_string="1 Jan 2025")
  twice = _variant(
      tmp_path,
      qwen_dir,
      {"eos_token": "<|im_end|>"},
      files={"chat_template.jinja": "{% for m in messages %}{{ m.content * 2 }}{% endfor %}"},
  )
  with pytest.raises(ValueError, match="2 times instead of once"):
    tokenizers.encode_chat_prompt(twice, "hi")


def test_chat_format_path_with_hf_tokenizer(qwen_dir, tmp_path):
  qwen = hf_tokenizer.HFTokenizer(qwen_dir)
  chat = tokenizers.ChatFormat()
  ids, index = tokenizers.encode_chat_prompt(qwen, "hello", chat)
  assert ids == qwen.encode(chat.prefix) + qwen.encode("hello") + qwen.encode(chat.suffix)
  assert index == len(qwen.encode(chat.prefix) + qwen.encode("hello"))
  with pytest.raises(ValueError, match="system='Be brief.'"):
    tokenizers.encode_chat_prompt(qwen, "hello", chat, system="Be brief.")
  base = _variant(tmp_path, qwen_dir, {"eos_token": "<|im_end|>"})
  assert base.chat_templates == {}
  assert tokenizers.encode_chat_prompt(base, "hello") == (ids, index)
  with pytest.raises(ValueError, match="has no chat template"):
    tokenizers.apply_chat_template(base, [{"role": "user", "content": "hello"}])


def test_template_selection_and_errors(qwen_dir, tmp_path):
  qwen = hf_tokenizer.HFTokenizer(qwen_dir)
  listed = [{"name": "default", "template": "D{{ messages[0].content }}"}]
  tool_use = {"additional_chat_templates/tool_use.jinja": "T{{ tools | tojson }}"}
  only_files = _variant(
      tmp_path / "files",
      qwen_dir,
      {"eos_token": "<|im_end|>", "chat_template": listed},
      None,
      tool_use,
  )
  assert list(only_files.chat_templates) == ["tool_use"]  # Template files replace the config's.
  only_config = _variant(
      tmp_path / "config", qwen_dir, {"eos_token": "<|im_end|>", "chat_template": listed}
  )
  assert only_config.chat_templates == {"default": listed[0]["template"]}
  named = _variant(
      tmp_path / "named",
      qwen_dir,
      {"eos_token": "<|im_end|>"},
      files={"chat_template.jinja": listed[0]["template"], **tool_use},
  )
  user = [{"role": "user", "content": "x"}]
  assert tokenizers.apply_chat_template(named, user) == "Dx"
  assert tokenizers.apply_chat_template(named, user, tools=[{"name": "é"}]) == 'T[{"name": "é"}]'
  with pytest.raises(ValueError, match="no chat template named 'missing'.*'default', 'tool_use'"):
    tokenizers.apply_chat_template(named, user, chat_template="missing")
  with pytest.raises(ValueError, match="empty conversation"):
    tokenizers.apply_chat_template(qwen, [])
  with pytest.raises(TypeError, match="Message 0 must be a mapping"):
    tokenizers.apply_chat_template(qwen, ["hello"])
  late_system = [user[0], {"role": "system", "content": "late"}]
  with pytest.raises(jinja2.TemplateError, match="Only the first message"):
    tokenizers.apply_chat_template(qwen, late_system)

  def bad(config, generation_config=None):
    return _variant(tmp_path / "bad", qwen_dir, config, generation_config)

  with pytest.raises(ValueError, match="has no eos token"):
    bad({"pad_token": "<|endoftext|>"})
  with pytest.raises(ValueError, match="'<missing>' is not in the vocabulary"):
    bad({"eos_token": "<missing>"})
  with pytest.raises(TypeError, match="eos_token_id .* got '7'"):
    bad({}, {"eos_token_id": "7"})
  with pytest.raises(ValueError, match=r"ids \[99999\] outside the vocabulary"):
    bad({}, {"eos_token_id": [3, 99999]})
  with pytest.raises(TypeError, match="chat_template .* got 7"):
    bad({"eos_token": "<|im_end|>", "chat_template": 7})
  with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
    hf_tokenizer.HFTokenizer(str(tmp_path))
  from_generation = bad({}, {"eos_token_id": 5})
  assert (from_generation.eos_id, from_generation.pad_id, from_generation.stop_ids) == (5, 5, (5,))


def test_module_works_without_transformers(qwen_dir):
  code = f"""
import sys
sys.modules["transformers"] = None
sys.modules["torch"] = None
from mopd_jax import hf_tokenizer, tokenizers
assert "tokenizers" not in sys.modules and "jinja2" not in sys.modules
tok = hf_tokenizer.HFTokenizer({qwen_dir!r})
ids, index = tokenizers.encode_chat_prompt(tok, "héllo", system="s", enable_thinking=False)
assert tok.decode(ids[:index]).endswith("héllo"), ids
"""
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr
