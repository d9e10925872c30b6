"""The reward system of post-training: rewards from several sources combined with per-source normalisation.

A `RewardSource` maps (example, response) to a float: the exact-answer verifier (`exact_answer_source`), the
code sandbox (`sandbox_source`), a checklist (`Checklist.as_source`), a judge model (`ReferenceJudge.as_source`),
a reward model (`RewardModel.as_source`). `RewardSystem(sources)(examples, responses) -> RewardBatch`.

Per-source normalisation: each source's N rewards are standardised over the batch, (r - mean) / (std + eps),
before the weighted sum, so a source on a large scale (a reward model's logits) does not drown a 0/1 verifier:
each normalised source has mean 0 and std ~1 and its weight alone sets its share. A source whose rewards in the
batch are all equal (every answer right, or a batch of one) carries no ranking information and contributes 0
after centering. `normalize=False` adds the raw reward times the weight instead.

Bad sources never crash the run: a source that raises, returns NaN / inf or returns something that is not a
number gives that example a raw reward of 0.0 (it enters the normalisation as a zero reward) and the reason
is counted in `RewardBatch.failures`. Reasons a source reports alongside a valid reward (`Outcome`; e.g. the
sandbox's "timeout") are counted in `RewardBatch.reasons`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

EPS = 1e-6  # added to a source's batch std before dividing


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A reward with the reasons behind it (counted in `RewardBatch.reasons`): a source may return this
    instead of a bare float, e.g. the sandbox's Outcome(0.5, ("timeout",)) when one of two tests timed out."""
    value: float
    reasons: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RewardSource:
    """name: unique within a system (metrics are `reward/{name}_...`). fn(example: dict, response: str) ->
    float (or `Outcome`). weight: its factor in the total, finite and > 0. normalize: standardise its rewards
    over the batch first. batch_fn(examples, responses) -> N floats, optional: the batched path (one model
    call for the batch); when it raises or returns the wrong count, its reason is counted once and the
    system falls back to `fn` per example."""
    name: str
    fn: Callable[[dict, str], Any]
    weight: float = 1.0
    normalize: bool = True
    batch_fn: Callable[[Sequence[dict], Sequence[str]], Sequence[Any]] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"RewardSource.name must be a non-empty str of letters, digits, _ . -, "
                             f"got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"reward source {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if self.batch_fn is not None and not callable(self.batch_fn):
            raise ValueError(f"reward source {self.name!r}: batch_fn must be callable or None, "
                             f"got {type(self.batch_fn).__name__}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"reward source {self.name!r}: weight must be a finite number > 0, got {self.weight!r}")


@dataclasses.dataclass
class RewardBatch:
    """total float32 [N]: sum over sources of weight * normalised reward. raw: name -> float64 [N], the reward
    each source gave (0.0 where it failed). normalized: name -> float64 [N], what entered the total before the
    weight. failures: name -> Counter(reason -> count) of examples the source gave no reward for ("raised
    ValueError", "nan", "not a number", "batch raised ..."). reasons: name -> Counter of `Outcome` reasons."""
    total: np.ndarray
    raw: dict[str, np.ndarray]
    normalized: dict[str, np.ndarray]
    failures: dict[str, collections.Counter]
    reasons: dict[str, collections.Counter]

    def metrics(self) -> dict[str, float]:
        """Flat metrics: reward/{name}_mean, _std (of the raw rewards), _failures (count), reward/total_mean,
        reward/total_std."""
        out = {}
        for name, r in self.raw.items():
            out[f"reward/{name}_mean"] = float(np.mean(r))
            out[f"reward/{name}_std"] = float(np.std(r))
            out[f"reward/{name}_failures"] = float(sum(self.failures[name].values()))
        out["reward/total_mean"] = float(np.mean(self.total))
        out["reward/total_std"] = float(np.std(self.total))
        return out


def _number(v: Any) -> tuple[float, str | None]:
    """A source's return value -> (reward, None), or (0.0, failure reason)."""
    try:
        a = np.asarray(v) if not isinstance(v, (str, bytes)) else None
    except Exception:  # noqa: BLE001 - an object whose __array__ raises
        a = None
    if a is None or a.shape != () or a.dtype.kind not in "biuf":
        return 0.0, "not a number"
    x = float(a)
    return (x, None) if math.isfinite(x) else (0.0, "nan")


def normalize(r: np.ndarray) -> np.ndarray:
    """r [N] -> (r - mean) / (std + EPS); all zeros when every reward is equal (nothing to rank)."""
    r = np.asarray(r, np.float64)
    if r.size == 0 or np.ptp(r) == 0:
        return np.zeros_like(r)
    return (r - r.mean()) / (r.std() + EPS)


class RewardSystem:
    """Sources with unique names; `system(examples, responses) -> RewardBatch` (see the module doc)."""

    def __init__(self, sources: Sequence[RewardSource]):
        sources = tuple(sources)
        if not sources:
            raise ValueError("RewardSystem needs at least one source, got none")
        names = set()
        for i, s in enumerate(sources):
            if not isinstance(s, RewardSource):
                raise ValueError(f"RewardSystem source {i} must be a RewardSource, got {type(s).__name__}")
            if s.name in names:
                raise ValueError(f"RewardSystem has two sources named {s.name!r}; names must be unique")
            names.add(s.name)
        self.sources = sources

    def _rewards(self, s: RewardSource, examples: Sequence[dict], responses: Sequence[str]):
        n = len(examples)
        raw, failures, reasons = np.zeros(n), collections.Counter(), collections.Counter()
        values = None
        if s.batch_fn is not None:
            try:
                values = list(s.batch_fn(examples, responses))
                if len(values) != n:
                    failures[f"batch returned {len(values)} rewards for {n}"] += 1
                    values = None
            except Exception as e:  # noqa: BLE001 - a broken source costs its reward, not the run
                failures[f"batch raised {type(e).__name__}"] += 1
        for i in range(n):
            if values is not None:
                v = values[i]
            else:
                try:
                    v = s.fn(examples[i], responses[i])
                except Exception as e:  # noqa: BLE001
                    failures[f"raised {type(e).__name__}"] += 1
                    continue
            if isinstance(v, Outcome):
                reasons.update(v.reasons)
                v = v.value
            raw[i], why = _number(v)
            if why is not None:
                failures[why] += 1
        return raw, failures, reasons

    def __call__(self, examples: Sequence[dict], responses: Sequence[str]) -> RewardBatch:
        """examples: N dicts (what the sources read: "prompt", "answer", "tests", ...); responses: N strs."""
        if isinstance(responses, str):
            raise ValueError(f"RewardSystem: responses must be a sequence of str, got one str {responses[:50]!r}")
        if len(examples) != len(responses):
            raise ValueError(f"RewardSystem: examples and responses must have the same length, got "
                             f"{len(examples)} examples and {len(responses)} responses")
        if len(examples) == 0:
            raise ValueError("RewardSystem: empty batch (0 examples)")
        total = np.zeros(len(examples))
        raw, normed, failures, reasons = {}, {}, {}, {}
        for s in self.sources:
            raw[s.name], failures[s.name], reasons[s.name] = self._rewards(s, examples, responses)
            normed[s.name] = normalize(raw[s.name]) if s.normalize else raw[s.name]
            total += s.weight * normed[s.name]
        return RewardBatch(total.astype(np.float32), raw, normed, failures, reasons)


# -- sources -------------------------------------------------------------------------------------------------
def exact_answer_source(check: Callable[[dict, str], bool] | None = None, *, name: str = "exact_answer",
                        weight: float = 1.0, normalize: bool = True) -> RewardSource:
    """1.0 when `check(example, response)` holds, else 0.0; default check: the embedded tasks' verifier
    `chat_tasks.check_response` (the whole response is the example's "answer")."""
    if check is None:
        from ernie_jax.synthetic.chat_tasks import check_response as check  # noqa: PLC0415

    def fn(example: dict, response: str) -> float:
        return 1.0 if check(example, response) else 0.0

    return RewardSource(name, fn, weight=weight, normalize=normalize)


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The program in a response: the last ```python fenced block when there is one, else the whole text."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def sandbox_source(*, name: str = "sandbox", weight: float = 1.0, normalize: bool = True,
                   extract: Callable[[str], str] = extract_program, check_available: bool = True,
                   **run_kwargs) -> RewardSource:
    """The fraction of example["tests"] (a list of (stdin, expected_stdout)) that the response's program
    passes, run by the code sandbox (`sandbox.run_python(code, stdin=..., **run_kwargs)`): a test passes when
    the run is ok and its stdout equals the expected one up to surrounding whitespace. Each failing run's
    reason (`SandboxResult.reason`, or "wrong_output") is counted in `RewardBatch.reasons`, "no_code" for a
    blank program. An example without tests is the caller's bug: the source raises (a counted failure).
    check_available: raise `SandboxUnavailable` now, with why, when the sandbox does not work here (rather
    than count a failure per example later)."""
    from ernie_jax.reward import sandbox  # noqa: PLC0415 - the sandbox only when this source is used

    if check_available and (why := sandbox.sandbox_available()) is not None:
        raise sandbox.SandboxUnavailable(f"sandbox_source {name!r}: {why}")

    def fn(example: dict, response: str) -> Outcome:
        tests = example.get("tests")
        if not tests:
            raise ValueError(f"sandbox source {name!r}: example has no 'tests' (a list of (stdin, expected_stdout))")
        code = extract(response)
        if not code.strip():
            return Outcome(0.0, ("no_code",))
        passed, reasons = 0, []
        for stdin, expected in tests:
            r = sandbox.run_python(code, stdin=stdin, **run_kwargs)
            if not r.ok:
                reasons.append(r.reason)
            elif r.stdout.strip() == expected.strip():
                passed += 1
            else:
                reasons.append("wrong_output")
        return Outcome(passed / len(tests), tuple(reasons))

    return RewardSource(name, fn, weight=weight, normalize=normalize)
