# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/05_grpo.py (chapter 05).
# Edit the chapter, then run the export again.

"""Rule-based rewards on the arithmetic world: accuracy (the <answer> parsed safely and checked) and format (the think
and answer tags), combined with weights; room for more parts (chapter 05)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dslib.world import Problem, parse_answer

# A completion of a prompt that ends at <think>: reasoning without tags, then "</think> <answer> N </answer>" and
# nothing after it. DeepSeek-R1's format reward asks for the same two tag pairs (arXiv 2501.12948, section 2.2.2).
_FORMAT_RE = re.compile(r"(?:(?!<think>|</think>|<answer>|</answer>).)*</think> <answer> [0-9]{1,12} </answer>",
                        re.ASCII | re.DOTALL)


def accuracy_reward(completion: object, problem: Problem) -> float:
    """1.0 when the first <answer> of the completion equals the problem's answer, else 0.0. The answer is parsed with
    a regular expression (dslib.world.parse_answer), never evaluated; any input, of any type, gives 0.0 or 1.0."""
    try:
        got = parse_answer(completion)
        return 1.0 if got is not None and got == problem.answer else 0.0
    except Exception:  # never raise: a reward is a number for every string
        return 0.0


def format_reward(completion: object, problem: Problem | None = None) -> float:
    """1.0 when the completion is `reasoning</think> <answer> N </answer>` with no other tags (the prompt opened
    <think>), else 0.0. Never raises."""
    if not isinstance(completion, str):
        return 0.0
    try:
        return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0
    except Exception:
        return 0.0


def reflects(completion: object) -> bool:
    """Does the reasoning contain the reflection token " wait "? (The aha moment's marker in this world.)"""
    return isinstance(completion, str) and " wait " in completion.split("</think>", 1)[0]


def style_of(completion: object) -> str:
    """"bare" (an empty think), "reflects" (" wait " in the think) or "steps" (other reasoning)."""
    if not isinstance(completion, str) or completion.startswith("</think>"):
        return "bare"
    return "reflects" if reflects(completion) else "steps"


RewardPart = Callable[[object, Problem], float]


@dataclass
class Rewards:
    """A weighted sum of rule-based reward parts: reward = sum_k weight_k * part_k(completion, problem).

    By default DeepSeek-R1-Zero's two rules (arXiv 2501.12948, section 2.2.2) with the pre-study's weights: 1 for a
    correct answer, 0.1 for the format. `parts` maps a name to (function, weight); add one (chapter 06 adds language
    consistency) without touching the trainer."""

    parts: dict[str, tuple[RewardPart, float]] = field(default_factory=lambda: {
        "accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.1)})

    def __post_init__(self) -> None:
        if not isinstance(self.parts, dict) or not self.parts:
            raise ValueError(f"Rewards.parts={self.parts!r} is invalid: a non-empty dict name -> (fn, weight)")
        for name, value in self.parts.items():
            if not (isinstance(value, tuple) and len(value) == 2 and callable(value[0])
                    and isinstance(value[1], (int, float))):
                raise ValueError(f"Rewards.parts[{name!r}]={value!r} is invalid: a (function, weight) pair")

    def score(self, completions: Sequence[str], problems: Sequence[Problem]) -> dict[str, list[float]]:
        """Each part's value per completion, and "total", the weighted sum."""
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
        out: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for name, (fn, weight) in self.parts.items():
            vals = []
            for c, p in zip(completions, problems):
                try:
                    v = float(fn(c, p))
                except Exception:  # a part that raises scores 0: rewards never stop training
                    v = 0.0
                vals.append(v)
            out[name] = vals
            total = [t + weight * v for t, v in zip(total, vals)]
        out["total"] = total
        return out
