r"""Per-device memory of the fused MOPD step, compiled ahead of time from abstract shapes.

    python -m benchmarks.step_memory --preset=qwen3-0.6b --rows=8 --group=8 \
        --prompt-len=1024 --response-len=2048 --peer-cap=1024
    python -m benchmarks.step_memory --preset=qwen3-4b --rows=256 --group=8 \
        --prompt-len=2048 --response-len=4096 --peer-cap=2048 \
        --mesh=1,8,1 --devices=8 --micro-batch-rows=16
    python -m benchmarks.step_memory --preset=qwen3-0.6b --num-layers=2 --rows=32 \
        --group=8 --prompt-len=128 --response-len=128 --peer-cap=64 --mesh=1,4,1 \
        --topology=v5e:2x2

No weight is materialised: parameters, optimizer state and teacher are ShapeDtypeStructs
on their shardings, the fused step (sample -> verify -> peers -> teacher -> loss ->
update) is lowered and compiled, and XLA's `compiled.memory_analysis()` gives the
per-device temporary, argument and output bytes (and `decode_weights_bytes`, the
sampler's copy of the weights in its decode layout, part of the temporary). `--devices=N`
fakes N CPU devices (it must be given before JAX starts, so this module imports JAX only
after parsing). Prints one JSON line.

`--topology=NAME [--num-slices=N]` (NAME as JAX spells it: v5e:2x2, v5p:2x2x2, v6e:2x4,
...; needs libtpu) compiles for that TPU topology's devices instead, from this host: the
mesh is `--mesh` within each slice and (N, 1, 1) across slices, the figures are the TPU
compiler's, the memory limit is the chip's HBM, and the JSON line adds `device` (the TPU's
kind), `attention` (the kernel `--attention` resolved to there), `partitioner` (Shardy, JAX's
default, or GSPMD with JAX_USE_SHARDY_PARTITIONER=false), `flops` and `bytes_accessed`
(cost analysis), `device_limit_bytes`, `fits`, and `collectives`: count and bytes of each
collective kind in the optimized HLO, inside the sampler's decode loop, inside the training
forward/backward, and the rest (`mopd_jax.topology.collectives`). For the sampler it adds
`decode_layout` (`--decode-layout`, see `config.sampling.decode_layout`),
`decode_step_collectives` (what one iteration of the decode loop, i.e. one generated token
of every row, communicates per device, each collective counted as often as the loops nested
in the body run it: `topology.decode_step_collectives`), `decode_collective_bytes_per_token`
(their total bytes), `weight_bytes_bf16` (2 bytes per parameter) and
`decode_collective_fraction_of_weights` (the ratio of the two), and `decode_reshard_bytes`
(the collectives that reshard the weights into the decode layout, once per step).

`--rows` counts sequences (prompts x group); `--peer-cap` is the per-block cap of the
peer context, so the teacher prompt is about prompt + 3 x cap + template tokens (2S1F).

`--packed-tokens=N` (and `--packed-teacher-tokens=M`) compile the padding-free update
(`config.optim.packed_tokens`, `mopd_jax.packing`; 0 = padded rows). Every line reports
`flops` (XLA's cost analysis of the compiled step, which counts each loop body once) and
`update_flops`: the matmul FLOPs of the update alone (teacher, student forward and
backward, loss; no sampling), counted from its jaxpr with every scan's trip count
(`benchmarks.flops`), with `student_row` / `teacher_row` (padded row lengths, the units of
the budgets). `--flops-only` counts `update_flops` without compiling anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", required=True, help="a preset of mopd_jax.models.presets")
  p.add_argument("--rows", type=int, required=True, help="sequences per step (B x G)")
  p.add_argument("--group", type=int, required=True, help="rollouts per prompt (G)")
  p.add_argument("--prompt-len", type=int, required=True)
  p.add_argument("--response-len", type=int, required=True)
  p.add_argument("--peer-cap", type=int, required=True)
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 = rest)")
  p.add_argument("--devices", type=int, default=0, help="fake this many CPU devices")
  p.add_argument("--micro-batch-rows", type=int, default=0)
  p.add_argument("--attention", default=None, help="model attention kind")
  p.add_argument("--num-layers", type=int, default=0, help="override the preset's depth")
  p.add_argument("--remat-policy", default=None, help="model remat policy")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--param-dtype", default="float32")
  p.add_argument("--chunk-size", type=int, default=32, help="loss chunk (positions)")
  p.add_argument("--top-k", type=int, default=100)
  p.add_argument("--decode-layout", default="tensor", choices=("tensor", "wide", "train"),
                 help="config.sampling.decode_layout")
  p.add_argument("--topology", default="",
                 help="compile for this TPU topology (e.g. v5e:2x2; needs libtpu)")
  p.add_argument("--num-slices", type=int, default=1, help="slices of --topology")
  p.add_argument("--packed-tokens", type=int, default=0,
                 help="config.optim.packed_tokens: token budget of a micro-batch's student "
                      "rows (0 = padded rows)")
  p.add_argument("--packed-teacher-tokens", type=int, default=0,
                 help="config.optim.packed_teacher_tokens (0 = as many rows as the student)")
  p.add_argument("--feedback-len", type=int, default=-1,
                 help="config.peers.feedback_len (-1 = its default; 0 = no feedback block)")
  p.add_argument("--flops-only", action="store_true",
                 help="only count the update's FLOPs from its jaxpr (no compile)")
  args = p.parse_args(argv)
  if args.topology and args.devices:
    p.error("--devices fakes CPU devices; it cannot be combined with --topology.")
  if args.num_slices > 1 and not args.topology:
    p.error("--num-slices needs --topology.")
  if args.rows % args.group:
    p.error(f"--rows={args.rows} must be a multiple of --group={args.group}.")
  return args


def compile_step(args) -> dict:
  """Lowers and compiles the fused step for `args`; returns the memory figures."""
  from mopd_jax.models import presets  # pylint: disable=import-outside-toplevel
  return compile_model_step(presets.get(args.preset), args)


@dataclasses.dataclass
class StepParts:
  """What compiling a step for `args` needs: its config, mesh, host verifier stand-in,
  optimizer, template pieces, state shapes and shardings, and abstract inputs."""
  cfg: object
  mesh: object
  host: object
  optimizer: object
  pieces: object
  state: object  # TrainState of ShapeDtypeStructs
  shardings: object  # TrainState of shardings
  abstract_state: object  # `state` with its shardings
  batch: dict  # abstract batch on its shardings


def build_step(model, args) -> StepParts:
  """The parts of the step for a given ModelConfig (the preset's depth, dtypes and
  attention overridden by `args`), on a mesh of CPU devices or of `args.topology`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mopd_jax import (peer_template, settings, sharding, teacher,  # pylint: disable=import-outside-toplevel
                        topology, train_step)
  from mopd_jax.models import transformer  # pylint: disable=import-outside-toplevel

  model = dataclasses.replace(model, dtype=args.dtype, param_dtype=args.param_dtype,
                              axis_rules=sharding.DEFAULT_RULES)
  overrides = {}
  if args.num_layers:
    overrides["num_layers"] = args.num_layers
  if args.attention:
    overrides["attention"] = args.attention
  if args.remat_policy:
    overrides["remat_policy"] = args.remat_policy
  model = dataclasses.replace(model, **overrides)
  prompts = args.rows // args.group
  cfg = train_step.StepConfig(
      model=model,
      sampling=settings.SamplingSettings(num_samples=args.group,
                                         max_response_len=args.response_len,
                                         decode_layout=args.decode_layout),
      peers=settings.PeerSettings(
          peer_cap=args.peer_cap, include_feedback=args.feedback_len != 0,
          **({"feedback_len": args.feedback_len} if args.feedback_len > 0 else {})),
      loss=settings.LossSettings(chunk_size=args.chunk_size, top_k=args.top_k),
      teacher=settings.TeacherSettings(),
      optim=settings.OptimSettings(micro_batch_rows=args.micro_batch_rows,
                                   packed_tokens=args.packed_tokens,
                                   packed_teacher_tokens=args.packed_teacher_tokens),
      stop_ids=(1,), pad_id=0)
  mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  if args.topology:
    mesh = sharding.make_mesh(mesh_shape, topology.devices(args.topology, args.num_slices),
                              dcn_shape=(args.num_slices, 1, 1))
  else:
    mesh = sharding.make_mesh(mesh_shape)
  optimizer, _ = train_step.make_optimizer(cfg.optim)
  param_dtype = transformer.dtype_from_name(model.param_dtype)
  params = jax.eval_shape(lambda: jax.tree.map(
      lambda x: x.astype(param_dtype), transformer.init_params(model, jax.random.PRNGKey(0))))
  state = jax.eval_shape(lambda p: train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
      teacher_params=teacher.init_teacher(p), rng=jax.random.PRNGKey(0)), params)
  param_shardings = sharding.logical_to_shardings(transformer.param_logical_axes(model),
                                                  params, mesh)
  shardings = train_step.state_shardings(state, param_shardings, mesh, optimizer)
  # Template pieces of realistic sizes (solution, another, failure, feedback headers,
  # closing); their token values do not matter for memory.
  pieces = peer_template.TemplatePieces(*[jnp.arange(n, dtype=jnp.int32) + 3
                                         for n in (6, 8, 14, 18, 10)])

  def host(ids, tokens, lengths):
    del tokens, lengths
    n = len(ids)
    return (np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros((n, 1), np.int32),
            np.zeros(n, np.int32))

  batch_sh = train_step.batch_shardings(mesh)
  shape = (prompts, args.prompt_len)
  batch = {"prompt_tokens": jax.ShapeDtypeStruct(shape, jnp.int32,
                                                 sharding=batch_sh["prompt_tokens"]),
           "prompt_mask": jax.ShapeDtypeStruct(shape, jnp.bool_,
                                               sharding=batch_sh["prompt_mask"]),
           "insert_index": jax.ShapeDtypeStruct(shape[:1], jnp.int32,
                                                sharding=batch_sh["insert_index"]),
           "example_id": jax.ShapeDtypeStruct(shape[:1], jnp.int32,
                                              sharding=batch_sh["example_id"])}
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, shardings)
  return StepParts(cfg=cfg, mesh=mesh, host=host, optimizer=optimizer, pieces=pieces,
                   state=state, shardings=shardings, abstract_state=abstract_state,
                   batch=batch)


def abstract_rollouts(parts: StepParts, args):
  """The verified rollouts the update reads, as ShapeDtypeStructs on the batch sharding."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mopd_jax import sharding, train_step  # pylint: disable=import-outside-toplevel

  n, lr = args.rows, args.response_len
  lf = max(parts.cfg.peers.feedback_room, 1)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=sharding.batch_sharding(parts.mesh, len(shape)))

  return train_step.Rollouts(
      tokens=spec((n, lr), jnp.int32), logprobs=spec((n, lr), jnp.float32),
      lengths=spec((n,), jnp.int32), finished=spec((n,), jnp.bool_),
      rewards=spec((n,), jnp.float32), status=spec((n,), jnp.int32),
      feedback=spec((n, lf), jnp.int32), feedback_lengths=spec((n,), jnp.int32))


def update_flops(parts: StepParts, args) -> dict:
  """Matmul FLOPs of the update (the split step's second half) from its jaxpr, and the
  padded row lengths of the student and the teacher."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import flops  # pylint: disable=import-outside-toplevel
  from mopd_jax import step_teacher, train_step  # pylint: disable=import-outside-toplevel

  step = train_step.make_split_step(parts.cfg, parts.mesh, parts.host, parts.optimizer,
                                    parts.pieces, parts.shardings)
  rollouts = abstract_rollouts(parts, args)
  traced = step.update.trace(parts.abstract_state, parts.batch, rollouts)
  with jax.set_mesh(parts.mesh):
    inputs = jax.eval_shape(
        lambda b, r: step_teacher.build_teacher_inputs(
            parts.cfg, parts.pieces, step_teacher.student_prompts(
                parts.cfg.peers, parts.pieces, b, parts.cfg.pad_id), r,
            jax.random.PRNGKey(0)), parts.batch, rollouts)
  lr = args.response_len
  return {"update_flops": flops.matmul_flops(traced),
          "student_row": inputs.prompt_tokens.shape[1] + lr,
          "teacher_row": inputs.teacher_tokens.shape[1] + lr}


def compile_model_step(model, args) -> dict:
  """`compile_step` for a given ModelConfig (see `build_step`)."""
  import jax  # pylint: disable=import-outside-toplevel

  from mopd_jax import memory_plan, sharding, topology, train_step  # pylint: disable=import-outside-toplevel
  from mopd_jax.models import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from mopd_jax.models import transformer  # pylint: disable=import-outside-toplevel

  parts = build_step(model, args)
  model, mesh, state, shardings = parts.cfg.model, parts.mesh, parts.state, parts.shardings
  prompts = args.rows // args.group
  counted = update_flops(parts, args)
  head = {"preset": args.preset, "num_layers": model.num_layers, "rows": args.rows,
          "group": args.group, "prompt_len": args.prompt_len,
          "response_len": args.response_len, "peer_cap": args.peer_cap,
          "micro_batch_rows": args.micro_batch_rows, "packed_tokens": args.packed_tokens,
          "packed_teacher_tokens": args.packed_teacher_tokens, **counted}
  if args.flops_only:
    return head
  step = train_step.make_train_step(parts.cfg, mesh, parts.host, parts.optimizer,
                                    parts.pieces, shardings)
  start = time.time()
  compiled = step.lower(parts.abstract_state, parts.batch).compile()
  compile_s = time.time() - start
  layout = parts.cfg.sampling.decode_layout
  kv = memory_plan.kv_cache_bytes(model, prompts=prompts, rows=args.rows,
                                  prompt_len=args.prompt_len, response_len=args.response_len,
                                  **memory_plan.kv_cache_split(model, mesh, layout))
  plan = memory_plan.make_plan(
      compiled, state, shardings, kv, mesh.devices.flat[0],
      decode_weights=memory_plan.decode_weight_bytes(model, state.params, mesh, layout),
      decode_layout=layout)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      **head, "mesh": dict(mesh.shape), "attention": getattr(model, "attention", "naive"),
      "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
      "temp_bytes": plan.temp, "argument_bytes": plan.argument,
      "output_bytes": plan.output, "total_bytes_per_device": plan.total,
      "params_bytes": plan.params, "opt_state_bytes": plan.opt_state,
      "teacher_bytes": plan.teacher, "kv_cache_bytes": plan.kv_cache,
      "decode_weights_bytes": plan.decode_weights,
      "compile_s": round(compile_s, 2), "device": plan.device_kind,
  }
  if not args.topology:
    return out
  # The kernel the model's attention resolves to on these devices, as the step saw it.
  with jax.set_mesh(mesh):
    q = jax.ShapeDtypeStruct((1, 1, model.num_heads, model.head_dim),
                             transformer.dtype_from_name(model.dtype))
    k = jax.ShapeDtypeStruct((1, 1, model.num_kv_heads, model.head_dim), q.dtype)
    kernel = attention_lib.resolve_kind(model.attention, q, k, model.precision)
  text = compiled.as_text()
  per_token = topology.decode_step_collectives(text)
  per_token_bytes = sum(c["bytes"] for c in per_token.values())
  weight_bytes = 2 * model.num_params
  out.update({
      "topology": args.topology, "num_slices": args.num_slices, "attention": kernel,
      "partitioner": "shardy" if jax.config.jax_use_shardy_partitioner else "gspmd",
      "device_limit_bytes": plan.device_limit, "fits": plan.fits(),
      "collectives": topology.collectives(text),
      "decode_layout": parts.cfg.sampling.decode_layout,
      "decode_step_collectives": per_token,
      "decode_collective_bytes_per_token": per_token_bytes,
      "weight_bytes_bf16": weight_bytes,
      "decode_collective_fraction_of_weights": per_token_bytes / weight_bytes,
      "decode_reshard_bytes": sum(
          c["bytes"] for c in topology.scoped_collectives(text, "decode_layout").values()),
  })
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(compile_step(args)))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
