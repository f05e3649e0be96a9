"""The teacher prompt's fixed text: template pieces, their token ids, and the static length.

Kept apart from `mopd_jax.peer_context`, which assembles prompts from tensors at every
step: the template is text fixed at start-up (MOPD spec, section 2), tokenized once
(`tokenize_pieces`), and read also by the demo's tokenizer training, the compile-only run
and the analyses, which assemble nothing. `teacher_prompt_length` is the static buffer
length every assembled prompt fits in, so it lives with the pieces it counts.
"""

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class TemplatePieces(NamedTuple):
  """Tokenized template text, fixed at start-up; each field is int32 [length].

  Attributes:
      solution_header: "\\nCorrect solution:\\n\\n".
      another_header: "\\nAnother successful solution:\\n\\n".
      failure_header: "\\nA known failed solution (avoid repeating this mistake):\\n\\n".
      feedback_header:
          "\\nThe following is feedback from your unsuccessful earlier attempt:\\n\\n".
      closing: "\\n\\nCorrectly solve the original question.".
      summary_instruction: the student's request for a summary (summaries variant only;
          None when not tokenized).
      summaries_header: "\\nSummaries of other attempts:\\n" (summaries variant only).
      summary_success: "\\n- successful: " before a successful member's summary.
      summary_failure: "\\n- unsuccessful: " before an unsuccessful member's summary.
  """

  solution_header: jax.Array
  another_header: jax.Array
  failure_header: jax.Array
  feedback_header: jax.Array
  closing: jax.Array
  summary_instruction: Optional[jax.Array] = None
  summaries_header: Optional[jax.Array] = None
  summary_success: Optional[jax.Array] = None
  summary_failure: Optional[jax.Array] = None

  def summary_pieces(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(instruction, header, success label, failure label); raises if not tokenized."""
    values = (self.summary_instruction, self.summaries_header, self.summary_success,
              self.summary_failure)
    if any(v is None for v in values):
      raise ValueError("The summaries variant needs TemplatePieces with summary_instruction, "
                       "summaries_header, summary_success and summary_failure "
                       "(see tokenize_pieces).")
    return values


# Template text of the teacher prompt (MOPD spec, section 2); each piece is tokenized once.
TEMPLATE_TEXTS = {
    "solution_header": "\nCorrect solution:\n\n",
    "another_header": "\nAnother successful solution:\n\n",
    "failure_header": "\nA known failed solution (avoid repeating this mistake):\n\n",
    "feedback_header": "\nThe following is feedback from your unsuccessful earlier attempt:\n\n",
    "closing": "\n\nCorrectly solve the original question.",
    # Summaries variant: the student's request (the authors' text; the newline before it
    # is the project's), then the teacher's block (the project's labels: the spec does not
    # restate the authors' item templates).
    "summary_instruction": "\nAfter your answer, briefly summarize your key approach in one "
                           "sentence inside <summary> tags, e.g. <summary>...</summary>.",
    "summaries_header": "\nSummaries of other attempts:\n",
    "summary_success": "\n- successful: ",
    "summary_failure": "\n- unsuccessful: ",
}


def tokenize_pieces(tokenizer) -> TemplatePieces:
  """TemplatePieces from a tokenizer with `encode(text) -> list[int]`."""
  return TemplatePieces(**{name: jnp.asarray(tokenizer.encode(text), jnp.int32)
                            for name, text in TEMPLATE_TEXTS.items()})


def teacher_prompt_length(
    prompt_len: int,
    pieces: TemplatePieces,
    peer_cap: int,
    feedback_cap: int = 0,
    num_summaries: int = 0,
    summary_cap: int = 0,
) -> int:
  """Static length Ltp of the teacher-prompt buffer (Python int).

  Args:
      prompt_len: Lp, padded length of the original prompts.
      pieces: tokenized template pieces.
      peer_cap: most tokens of one peer response shown.
      feedback_cap: most tokens of feedback shown; 0 reserves no room for feedback.
      num_summaries: k summary slots; 0 reserves no room for summaries.
      summary_cap: most tokens of one summary shown.
  """
  for name, value in (("prompt_len", prompt_len), ("peer_cap", peer_cap),
                      ("feedback_cap", feedback_cap), ("num_summaries", num_summaries),
                      ("summary_cap", summary_cap)):
    if not isinstance(value, numbers.Integral) or value < 0:
      raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
  length = (prompt_len + len(pieces.solution_header) + len(pieces.another_header)
            + len(pieces.failure_header) + 3 * peer_cap + len(pieces.closing))
  if feedback_cap > 0:
    length += len(pieces.feedback_header) + feedback_cap
  if num_summaries > 0:
    _, header, success_label, failure_label = pieces.summary_pieces()
    label = max(len(success_label), len(failure_label))
    length += len(header) + num_summaries * (label + summary_cap)
  return int(length)
