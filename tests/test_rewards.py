"""Unit tests of dslib.rewards: accuracy and format on hand-made completions, and fuzzing with hypothesis (a reward is
0 or 1 and never raises, on any string or object)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dslib.rewards import Rewards, accuracy_reward, format_reward, reflects, style_of
from dslib.world import Problem, World

P = Problem((7, 35, 12), ("+", "-"), 2)  # 07+35-12 = 30
TOKENS = ["<think>", "</think>", "<answer>", "</answer>", " wait ", " ", "30", "3", "0", "-", "+", "=", "eval(", "\n",
          "1e9", "99999999999999999999", "\x00"]


def test_accuracy_and_format():
    good = "07+35=42 42-12=30</think> <answer> 30 </answer>"
    assert accuracy_reward(good, P) == 1.0 and format_reward(good) == 1.0
    assert accuracy_reward("</think> <answer> 31 </answer>", P) == 0.0
    assert format_reward("</think> <answer> 31 </answer>") == 1.0  # format is not correctness
    assert format_reward("</think> <answer> 30 </answer> trailing") == 0.0
    assert format_reward("<think></think> <answer> 30 </answer>") == 0.0
    assert format_reward("no tags at all") == 0.0
    assert accuracy_reward("</think> <answer> __import__('os') </answer>", P) == 0.0
    assert accuracy_reward(None, P) == 0.0 and format_reward(12) == 0.0


def test_rewards_weighted_sum_and_extra_parts():
    texts = ["x</think> <answer> 30 </answer>", "</think> <answer> 29 </answer>", "garbage"]
    s = Rewards().score(texts, [P] * 3)
    assert s["total"] == [1.1, 0.1, 0.0] and s["accuracy"] == [1.0, 0.0, 0.0]

    def boom(c, p):
        raise RuntimeError

    r = Rewards(parts={"accuracy": (accuracy_reward, 1.0), "short": (lambda c, p: float(len(c) < 20), 0.5),
                       "boom": (boom, 1.0)})
    assert r.score(texts, [P] * 3)["total"] == [1.0, 0.0, 0.5]


def test_world_documents_score_as_expected():
    world, rng = World(n_docs=10), random.Random(0)
    for style in ("bare", "steps", "guess_verify", "slip_fix", "slip"):
        for _ in range(20):
            d = world.document(world.sample_problem(rng), style, rng)
            assert format_reward(d.completion) == 1.0
            assert accuracy_reward(d.completion, d.problem) == float(d.correct)
            assert reflects(d.completion) == d.reflects
            assert style_of(d.completion) == ("bare" if style == "bare" else "reflects" if d.reflects else "steps")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(TOKENS), max_size=12).map("".join),
                 st.none(), st.integers(), st.binary()))
def test_rewards_never_raise(text):
    a, f = accuracy_reward(text, P), format_reward(text)
    assert a in (0.0, 1.0) and f in (0.0, 1.0)
    assert style_of(text) in ("bare", "steps", "reflects")
    if a == 1.0:
        assert "30" in text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=30), st.integers(0, 99))
def test_well_formed_completions_score(think, answer):
    text = f"{think}</think> <answer> {answer:02d} </answer>"
    assert format_reward(text) == 1.0
    assert accuracy_reward(text, P) == float(answer == 30)
