r"""Answer strings of the math verifier: the last \boxed{...} of a response, and normalisation.

The extraction and normalisation rules are described in the docstring of
`mopd_jax.verifiers.math`.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# Extraction.

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def _brace_partners(text: str) -> dict[int, int]:
  """Maps the index of each closed `{` of `text` to the index of its `}` (escapes skipped)."""
  partners, stack = {}, []
  for match in _BRACE_OR_ESCAPE.finditer(text):
    char = match.group()
    if char == "{":
      stack.append(match.start())
    elif char == "}" and stack:
      partners[stack.pop()] = match.start()
  return partners


def last_box(response: str) -> tuple[str | None, str]:
  """(content of the last box, "") or (None, why there is no usable box)."""
  opens = [match.end() - 1 for match in _BOX_OPEN.finditer(response)]
  if not opens:
    return None, r"No \boxed{...} answer found in the response."
  start = opens[-1]
  end = _brace_partners(response).get(start)
  if end is None:
    return None, r"The last \boxed{ of the response is never closed."
  content = response[start + 1 : end]
  if not content.strip():
    return None, r"The last \boxed{} of the response is empty."
  return content, ""


def extract_boxed(response: str) -> str | None:
  r"""The content of the last `\boxed{...}`/`\fbox{...}` of `response`; None if absent or open."""
  return last_box(response)[0]


# ---------------------------------------------------------------------------------------------
# Normalisation.

_CHAR_REPLACEMENTS = (
    ("\u2212", "-"),
    ("\u00d7", r"\times "),
    ("\u00b7", r"\cdot "),
    ("\u22c5", r"\cdot "),
    ("\u00f7", r"\div "),
    ("\u03c0", r"\pi "),
    ("\u221e", r"\infty "),
    ("\u221a", r"\sqrt"),
    ("\u2264", r"\le "),
    ("\u2265", r"\ge "),
    ("\u2260", r"\ne "),
    ("\u222a", r"\cup "),
    ("\u00b0", ""),
)
_SUBSTITUTIONS = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\\\$", ""),
        (r"\$", ""),
        (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"),
        (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
        (r"\\(?:left|right)\.", ""),
        (r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", ""),
        (r"\\(?:displaystyle|textstyle|scriptstyle|limits)(?![a-zA-Z])", ""),
        (r"\\q?quad(?![a-zA-Z])", " "),
        (r"~", " "),
        (r"\\lbrace(?![a-zA-Z])", r"\\{"),
        (r"\\rbrace(?![a-zA-Z])", r"\\}"),
        (r"\\(?:leqslant|leq)(?![a-zA-Z])", r"\\le"),
        (r"\\(?:geqslant|geq)(?![a-zA-Z])", r"\\ge"),
        (r"\\neq(?![a-zA-Z])", r"\\ne"),
        (r"\\(?:[lr]?vert)(?![a-zA-Z])", "|"),
        (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", ""),
        (r"\\%", "%"),
    )
)
# `\\` (a matrix row break) stays; `\,`, `\;`, `\:`, `\!` and `\ ` become a space.
_SPACING = re.compile(r"\\\\|\\[,;:! ]")
_WHITESPACE = re.compile(r"\s+")
_TRAILING_TEXT_UNIT = re.compile(
    r"(?<=[\d}).%])\s?\\(?:text|textrm|textnormal|mbox)\s?\{\s?[a-zA-Z][a-zA-Z./ ^\d]{0,40}\}"
    r"(?:\^\{?[23]\}?)?$"
)
_WRAPPER = re.compile(
    r"\\(?:text|textrm|textnormal|textbf|textit|textsf|texttt|emph|mathrm|mathbf|mathit|"
    r"mathsf|mathtt|mathbb|mathcal|mbox|hbox|operatorname|boldsymbol|bm|boxed|fbox)\s*\{"
)
_UNIT_WORDS = (
    "units?|square units?|cubic units?|sq units?|cm|mm|km|kg|mg|ml|mL|ft|feet|foot|inch|inches|"
    "meters?|metres?|kilometers?|centimeters?|millimeters?|miles?|mph|yards?|hours?|hrs?|"
    "minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|dollars?|cents?|degrees?|"
    "liters?|litres?|grams?|kilograms?|pounds?|lbs?|ounces?|oz"
)
_TRAILING_UNIT_WORD = re.compile(rf"(?<=[\d}})])\s?(?:{_UNIT_WORDS})\s?(?:\^\{{?[23]\}}?)?$")
_BARE_FUNCTION = re.compile(
    r"(?<![\\a-zA-Z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|ln|log|exp|"
    r"sqrt|pi|infty)(?![a-zA-Z])"
)
_COMMAND_SPACE = re.compile(r"(\\[a-zA-Z]+) (?=[a-zA-Z])")
_LEADING_VARIABLE = re.compile(
    r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_(?:\{[a-zA-Z0-9]*\}|[a-zA-Z0-9]))?"
    r"(?:=|\\in(?![a-zA-Z])|\\approx(?![a-zA-Z]))"
)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\{[a-zA-Z*]+\}")


def _unwrap(text: str) -> str:
  """`text` with each `\\text{...}`-like wrapper replaced by its content (one linear pass)."""
  pieces, closers, position = [], [], 0
  for match in _BRACE_OR_ESCAPE.finditer(text):
    start, token = match.start(), match.group()
    if start < position:
      continue
    wrapper = _WRAPPER.match(text, start) if token[0] == "\\" else None
    if wrapper:
      pieces.append(text[position:start] + " ")
      closers.append(True)
      position = wrapper.end()
    elif token == "{":
      closers.append(False)
    elif token == "}" and closers and closers.pop():
      pieces.append(text[position:start] + " ")
      position = match.end()
  pieces.append(text[position:])
  return "".join(pieces)


def normalize_answer(answer: str) -> str:
  """The normalised form of an answer string (see the module docstring)."""
  text = answer.strip()
  for old, new in _CHAR_REPLACEMENTS:
    text = text.replace(old, new)
  for pattern, replacement in _SUBSTITUTIONS:
    text = pattern.sub(replacement, text)
  text = _SPACING.sub(lambda match: match.group() if match.group() == "\\\\" else " ", text)
  text = _WHITESPACE.sub(" ", text).strip()
  while True:
    shorter = _TRAILING_TEXT_UNIT.sub("", text).strip()
    if shorter == text or not shorter:
      break
    text = shorter
  text = _WHITESPACE.sub(" ", _unwrap(text)).strip()
  shorter = _TRAILING_UNIT_WORD.sub("", text).strip()
  text = shorter or text
  text = _BARE_FUNCTION.sub(r"\\\1", text)
  text = _COMMAND_SPACE.sub("\\1\x00", text).replace(" ", "").replace("\x00", " ")
  text = text.replace("{,}", "").rstrip(".")
  leading = _LEADING_VARIABLE.match(text)
  if leading and leading.end() < len(text) and "=" not in text[leading.end() :]:
    text = text[leading.end() :]
  if _THOUSANDS.fullmatch(text):
    text = text.replace(",", "")
  return text


def is_text(answer: str) -> bool:
  """Whether a normalised answer is prose rather than math (a run of 3+ plain letters)."""
  return _TEXT_WORD.search(_ENVIRONMENT.sub("", answer)) is not None
