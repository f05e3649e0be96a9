"""Allowed values of the run settings, in one place and free of heavy imports.

`mopd_jax.settings` validates the config against these tuples, and the implementations
(losses, sampler, teacher, attention, model, peer selection and controls, data sources)
import them from here, so that parsing a config imports neither JAX nor the model.
"""


class ConfigError(ValueError):
  """An invalid run setting; the message names the key, the value and what is allowed."""


# loss.aggregation (`mopd_jax.losses.aggregate`).
AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                     "seq-mean-token-mean-all")
# teacher.mode (`mopd_jax.teacher`).
TEACHER_MODES = ("ema", "frozen", "trust_region", "external")
# sampling.decode_layers (`mopd_jax.sampling.Sampler`).
DECODE_LAYERS = ("scan", "unrolled")
# sampling.decode_layout (`mopd_jax.sampling.Sampler`): the sampler's weights resharded
# to `sharding.DECODE_RULES` ("tensor") or `sharding.WIDE_DECODE_RULES` ("wide"), or left
# in the training layout ("train"); "auto" = "tensor" unless the memory plan says its copy
# does not fit, then "wide" (`train_setup.Setup.compile_step`).
SAMPLER_LAYOUTS = ("tensor", "wide", "train")
DECODE_LAYOUTS = ("auto",) + SAMPLER_LAYOUTS
# model.attention (`mopd_jax.models.attention`).
ATTENTION_KINDS = ("auto", "naive", "blockwise", "cudnn", "splash", "splash_interpret")
# model.matmul_precision: names of `jax.lax.Precision` values (None = backend default).
MATMUL_PRECISIONS = ("default", "high", "highest")
# model.remat_policy: names of `jax.checkpoint_policies` ('none' = no remat, 'full' =
# nothing_saveable).
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")
# peers.failure_condition (`mopd_jax.peer_selection`).
FAILURE_CONDITIONS = ("always", "when_no_solution")
# peers.control and peers.control_budget (`mopd_jax.peer_controls`).
CONTROLS = ("random_peer", "unrelated_prompt", "success_only_matched")
BUDGETS = ("blocks", "tokens")
# data.task of a real-data task -> the domain of its verifier.
TASK_DOMAINS = {"code": "code", "math": "math", "science": "choice", "tooluse": "tooluse"}
# data.source / data.eval_source (`mopd_jax.data.sources`: one reader each).
SOURCE_KINDS = ("livecodebench", "deepmath", "aime", "sciknoweval", "toolalpaca",
                "mopd_parquet", "humaneval", "mmath", "bfcl")
