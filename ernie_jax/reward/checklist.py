"""Checklist verifier of the post-training reward: a list of objective checks over a response, each scored.

A `Check` is a named predicate over the response text with a weight; `Checklist.score(response)` gives the
weighted fraction of checks passed, in [0, 1], and which passed. A check that raises (or returns something
other than a bool) counts as failed and its reason is kept in `ChecklistResult.errors`: a broken check costs
the response that check's weight, never the run. The factories below (`max_words`, `contains`, `matches`,
`no_repeated_line`, `ends_with`) cover the usual instruction-following constraints ("at most 50 words", "end
with 'Done.'"); anything else is a `Check` with its own function.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np

from ernie_jax.reward.combine import Outcome, RewardSource


@dataclasses.dataclass(frozen=True)
class Check:
    """name: unique within its checklist. fn(response) -> bool. weight: its share of the score, > 0."""
    name: str
    fn: Callable[[str], bool]
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Check.name must be a non-empty str, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"check {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"check {self.name!r}: weight must be a finite number > 0, got {self.weight!r}")


@dataclasses.dataclass(frozen=True)
class ChecklistResult:
    """score: sum of the passed checks' weights / sum of all weights, in [0, 1]. passed: check name -> bool,
    in checklist order. errors: check name -> why it failed without answering (raised, not a bool)."""
    score: float
    passed: dict[str, bool]
    errors: dict[str, str]


class Checklist:
    """An ordered set of `Check`s with unique names; `score(response) -> ChecklistResult`."""

    def __init__(self, checks: Sequence[Check]):
        checks = tuple(checks)
        if not checks:
            raise ValueError("Checklist needs at least one check, got none")
        seen = set()
        for i, c in enumerate(checks):
            if not isinstance(c, Check):
                raise ValueError(f"Checklist check {i} must be a Check, got {type(c).__name__}: {c!r}")
            if c.name in seen:
                raise ValueError(f"Checklist has two checks named {c.name!r}; names must be unique")
            seen.add(c.name)
        self.checks = checks
        self.total_weight = float(sum(c.weight for c in checks))

    def score(self, response: str) -> ChecklistResult:
        """Run every check on `response` (a str); a check that raises or returns a non-bool fails."""
        if not isinstance(response, str):
            raise ValueError(f"Checklist.score: response must be a str, got {type(response).__name__}")
        passed, errors, got = {}, {}, 0.0
        for c in self.checks:
            try:
                v = c.fn(response)
            except Exception as e:  # noqa: BLE001 - a broken check fails, it does not stop the run
                passed[c.name], errors[c.name] = False, f"raised {type(e).__name__}: {e}"
                continue
            if not isinstance(v, (bool, np.bool_)):
                passed[c.name], errors[c.name] = False, f"returned {type(v).__name__} {v!r}, not a bool"
                continue
            passed[c.name] = bool(v)
            got += c.weight if v else 0.0
        return ChecklistResult(got / self.total_weight, passed, errors)

    def as_source(self, name: str = "checklist", weight: float = 1.0, normalize: bool = True):
        """A `RewardSource` scoring each response with this checklist (the example is not read); the
        errors of broken checks are reported as the source's reasons."""
        def fn(example: dict, response: str) -> Outcome:
            r = self.score(response)
            return Outcome(r.score, tuple(f"check {k} " + (v.split(":")[0] if v.startswith("raised") else "not a bool")
                                          for k, v in r.errors.items()))

        return RewardSource(name, fn, weight=weight, normalize=normalize)


# -- ready-made checks ---------------------------------------------------------------------------------------
def max_words(n: int, *, name: str | None = None, weight: float = 1.0) -> Check:
    """At most `n` whitespace-separated words."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"max_words: n must be an int >= 0, got {n!r}")
    return Check(name or f"max_words({n})", lambda r: len(r.split()) <= n, weight)


def contains(s: str, *, name: str | None = None, weight: float = 1.0) -> Check:
    """`s` occurs in the response (case-sensitive)."""
    if not isinstance(s, str) or not s:
        raise ValueError(f"contains: s must be a non-empty str, got {s!r}")
    return Check(name or f"contains({s!r})", lambda r: s in r, weight)


def matches(regex: str, *, name: str | None = None, weight: float = 1.0) -> Check:
    """`re.search(regex, response)` finds a match (compiled here: a bad pattern fails at construction)."""
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as e:
        raise ValueError(f"matches: regex {regex!r} does not compile: {e}") from e
    return Check(name or f"matches({regex!r})", lambda r: pattern.search(r) is not None, weight)


def no_repeated_line(*, name: str = "no_repeated_line", weight: float = 1.0) -> Check:
    """No non-blank line (stripped) appears twice: catches a policy that loops."""
    def fn(r: str) -> bool:
        lines = [line.strip() for line in r.splitlines() if line.strip()]
        return len(lines) == len(set(lines))
    return Check(name, fn, weight)


def ends_with(s: str, *, name: str | None = None, weight: float = 1.0) -> Check:
    """The response, trailing whitespace removed, ends with `s`."""
    if not isinstance(s, str) or not s:
        raise ValueError(f"ends_with: s must be a non-empty str, got {s!r}")
    return Check(name or f"ends_with({s!r})", lambda r: r.rstrip().endswith(s), weight)
