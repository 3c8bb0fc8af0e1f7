"""Turn engine outputs into per-finding probabilities (pure functions, tested without an engine).

yes/no: P(yes) = sigmoid(logsumexp(yes-like tokens) - logsumexp(no-like tokens)) at the first
answer token. json: at each value position of the schema-constrained object, P(true) from
the logprobs of the tokens that begin "true" versus "false" (the grammar mask is applied
before logprobs, so those are the only candidates).
"""
from __future__ import annotations

import json
import math
import re
from typing import Optional

YES = ("yes", "Yes", " yes", " Yes", "YES")
NO = ("no", "No", " no", " No", "NO")


def _lse(xs):
    xs = [x for x in xs if x is not None and x > -math.inf]
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


def yesno_probability(token_logprobs: dict[str, float]) -> Optional[float]:
    """token text -> logprob at the answer position. None when neither side is present."""
    y = _lse([lp for t, lp in token_logprobs.items() if t in YES])
    n = _lse([lp for t, lp in token_logprobs.items() if t in NO])
    if y == -math.inf and n == -math.inf:
        return None
    if n == -math.inf:
        return 1.0
    if y == -math.inf:
        return 0.0
    return sigmoid(y - n)


class ParseError(ValueError):
    pass


def json_probabilities(text: str, steps: list[tuple[str, dict[str, float]]], names: list[str]) -> dict[str, float]:
    """text: the generated JSON; steps: (token text, {candidate text: logprob}) per generated token.

    Validates the object against the label set, then reads P(true) at each value position.
    Raises ParseError when the output does not parse or validate (the caller retries).
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParseError(f"output is not JSON ({e.msg} at {e.pos})") from e
    if not isinstance(obj, dict) or set(obj) != set(names) or not all(isinstance(v, bool) for v in obj.values()):
        raise ParseError("JSON object does not match the label-set schema")
    probs: dict[str, float] = {}
    prefix = ""
    key_re = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*$')
    for tok, cands in steps:
        m = key_re.search(prefix)
        if m and tok.strip() and tok.strip()[0] in "tf":
            name = json.loads(f'"{m.group(1)}"')
            t = _lse([lp for c, lp in cands.items() if c.strip() and "true".startswith(c.strip())])
            f = _lse([lp for c, lp in cands.items() if c.strip() and "false".startswith(c.strip())])
            if name in obj and name not in probs:
                probs[name] = 1.0 if f == -math.inf else 0.0 if t == -math.inf else sigmoid(t - f)
        prefix += tok
    for n in names:  # a value token the logprobs did not cover falls back to the decision itself
        probs.setdefault(n, 1.0 if obj[n] else 0.0)
    return probs
