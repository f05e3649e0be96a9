r"""MOPD on code: the local CPU demo (default) and paper-scale presets.

The default runs a real MOPD run on a laptop-class CPU in a few minutes: a small
pretrained student (built reproducibly on first use) learns the demo code task with
2S1F peer context, an EMA self-teacher and a top-k generalised JSD, and is evaluated on
held-out problems before and after:

  python -m mopd_jax.main --config=configs/code.py --workdir=/tmp/mopd_demo

Shorter, e.g. for a smoke test:

  python -m mopd_jax.main --config=configs/code.py --workdir=/tmp/mopd_smoke \
      --config.total_steps=3 --config.eval_every=0 --config.eval.num_prompts=8

Classic OPD, or MOPD with an external teacher, on the demo: the demo's larger teacher
(same tokenizer, twice the layers, more often right; built next to the base model on
first use) scores the student's rollouts:

  python -m mopd_jax.main --config=configs/code.py --workdir=/tmp/mopd_opd \
      --config.algorithm.name=opd --config.loss.alpha=1.0 \
      --config.teacher.mode=external --config.teacher.checkpoint=demo \
      --config.teacher.param_dtype=float32

Any key can be overridden on the command line (`--config.optim.lr=3e-4`); every key,
its default and what it allows are defined once, in `mopd_jax/settings/`.

Paper-scale presets (MOPD spec section 5) need a Hugging Face checkpoint and a data
cache directory, and fail at start-up without them:

  python -m mopd_jax.main --config=configs/code.py:qwen3_4b --workdir=/tmp/q4b \
      --config.model.checkpoint=/ckpt/Qwen3-4B --config.data.cache_dir=/tmp/q4b_data

  # External teacher (classic OPD with peer context): Qwen3-14B teaches Qwen3-4B.
  python -m mopd_jax.main --config=configs/code.py:qwen3_4b_teacher_qwen3_14b \
      --workdir=/tmp/opd --config.model.checkpoint=/ckpt/Qwen3-4B \
      --config.teacher.checkpoint=/ckpt/Qwen3-14B --config.data.cache_dir=/tmp/opd_data

  # LiveCodeBench v6 (the paper's code benchmark): the problems of release v6 with the
  # SDPO-style split, half of each problem's tests to train on and the other half to
  # evaluate on; `data.path` is the directory of code_generation_lite's test*.jsonl.
  python -m mopd_jax.main --config=configs/code.py:lcb --workdir=/tmp/lcb \
      --config.model.checkpoint=/ckpt/Qwen3-4B --config.data.cache_dir=/tmp/lcb_data \
      --config.data.path=/data/code_generation_lite

The qwen3_4b presets train on the demo code task; `lcb` on LiveCodeBench.
"""

import ml_collections

from mopd_jax import settings


PRESETS = ("demo", "qwen3_4b", "qwen3_4b_teacher_qwen3_14b", "lcb")


def get_config(arg=None):
  """arg: None / 'demo' (local CPU demo) or one of the paper-scale PRESETS.

  Every section starts from the defaults in `mopd_jax.settings` (the paper's settings,
  MOPD spec section 5); the demo shrinks the model, the lengths and the batch.
  """
  arg = arg or "demo"
  if arg not in PRESETS:
    raise ValueError(f"Unknown preset {arg!r} for configs/code.py; available: {PRESETS}.")
  c = settings.base_config(seed=42, total_steps=60, checkpoint_every=20,
                           keep_checkpoints=3, eval_every=30, log_every=1)

  # Model: 'demo' = the built-in base model (built and cached on first use).
  c.model.checkpoint = "demo"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  # At the demo's tiny sizes on a CPU: keep the layers' activations (no remat) and unroll
  # the scan over the two layers (README, "The demo's step time").
  c.model.remat_policy = "none"
  c.model.unroll_layers = True

  c.data.task = "demo_code"
  c.data.batch_size = 16  # prompts per step; rows = batch_size * sampling.num_samples
  c.data.max_prompt_len = 48

  # Student sampling during training (MOPD spec: temperature 1, top_p 1, top_k off).
  c.sampling.num_samples = 4  # G rollouts per prompt (paper: 8)
  c.sampling.max_response_len = 40

  # Peer context: 2S1F with condition "always" (the paper's best configuration).
  c.peers.failure_condition = "always"
  c.peers.peer_cap = 40  # tokens per peer block
  # Own feedback (the authors' default, on in the presets below) is off in the demo: it
  # lengthens every teacher prompt by `feedback_len` tokens. The base model is pretrained
  # on teacher prompts with it, so --config.peers.include_feedback=True works as well.
  c.peers.include_feedback = False
  # With --config.peers.include_feedback=True: room for the demo verifier's feedback (on
  # wrong demo programs at most ~320 tokens; median 95).
  c.peers.feedback_len = 320

  c.loss.alpha = 0.5
  c.loss.top_k = 100
  c.loss.chunk_size = 64

  c.teacher.mode = "ema"  # ema | frozen | trust_region | external
  # Paper: 0.05 at lr 1e-5 on 4B models. The demo's tiny model takes 10x larger steps;
  # with 0.05 its self-teacher drifts with the student after ~50 steps (see README).
  c.teacher.ema_rate = 0.01

  c.optim.lr = 1e-4
  c.optim.warmup_steps = 5

  # A sandboxed run mostly waits on the kernel (namespaces, cgroup, process start-up and
  # teardown), so more concurrent runs than cores overlap those waits.
  c.verifier.max_workers = 8

  c.eval.num_prompts = 96
  c.eval.num_samples = 4
  c.eval.temperature = 1.0
  c.eval.top_p = 1.0

  # Mesh ('data', 'fsdp', 'tensor'); one -1 takes the remaining devices.
  c.mesh.shape = (-1, 1, 1)
  if arg != "demo":
    _paper_scale(c, arg)
  return c


def _paper_scale(c, arg):
  """MOPD spec section 5: Qwen3-4B student, 2S1F, B=32 x G=8, lr 1e-5, bf16."""
  placeholder = ml_collections.config_dict.placeholder
  c.model.checkpoint = placeholder(str)  # required: a Hugging Face checkpoint directory
  c.model.preset = "qwen3-4b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.data.batch_size = 32
  c.data.max_prompt_len = 2048
  c.sampling.num_samples = 8
  c.sampling.max_response_len = 4096
  c.peers.peer_cap = 2048
  c.peers.include_feedback = True  # the authors' default (own feedback without a solution)
  c.loss.chunk_size = 32
  c.teacher.ema_rate = 0.05
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 10
  c.model.remat_policy = "full"
  c.model.unroll_layers = False
  c.verifier.max_workers = None  # one per core
  c.total_steps = 200
  c.checkpoint_every = 50
  c.eval_every = 5
  c.eval.num_prompts = 64
  c.eval.num_samples = 8
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.mesh.shape = (1, -1, 1)  # FSDP over all devices
  if arg == "lcb":
    c.data.task = "code"
    c.data.source = "livecodebench"
    c.data.path = placeholder(str)  # required: the directory of test*.jsonl
    c.data.options = '{"release": "v6", "split": "train"}'
    c.data.eval_options = '{"release": "v6", "split": "test"}'
  if arg == "qwen3_4b_teacher_qwen3_14b":
    c.teacher.mode = "external"
    c.teacher.checkpoint = placeholder(str)  # required: Qwen3-14B checkpoint directory
    c.teacher.param_dtype = "bfloat16"
