"""Unit tests of dslib.r1zero: the pass@k estimator against a brute-force count, cons@k and its ties, the aha finder
on handmade and hostile transcripts, the measures on handmade samples (reflection per response and per problem,
truncation, format, difficulty), the sampler, fresh problems by difficulty, the time to doubling and a checkpointed
R1-Zero run that resumes to the same evaluations."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dslib.grpo import GRPOConfig
from dslib.r1zero import (Samples, cons_at_k, find_aha, measure, pass_at_k, pass_at_k_curve, problems_with_ops,
                          run_r1zero, sample_k, time_to_double)
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import Problem, World

pytestmark = pytest.mark.usefixtures("one_thread")

P = Problem((83, 29, 7), ("-", "+"))  # 83-29+07 = 61


def brute_pass_at_k(outcomes, k):
    subsets = list(combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12), st.data())
def test_pass_at_k_equals_brute_force(outcomes, data):
    k = data.draw(st.integers(1, len(outcomes)))
    assert abs(pass_at_k(len(outcomes), sum(outcomes), k) - brute_pass_at_k(outcomes, k)) < 1e-12


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 6, 5) == 1.0
    assert abs(pass_at_k(10, 3, 1) - 0.3) < 1e-12  # pass@1 is the sample accuracy
    assert 0 < pass_at_k(200, 1, 100) < 1  # large n stays finite
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1), (5.0, 2, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    table = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    assert np.allclose(pass_at_k_curve(table, [1, 4]), [(0.25 + 1 + 0) / 3, (1 + 1 + 0) / 3])


def test_cons_at_k_and_ties():
    assert cons_at_k([[7, 7, 3]], [7]) == 1.0
    assert cons_at_k([[3, 3, 7]], [7]) == 0.0
    assert cons_at_k([[7, 3]], [7]) == 0.5  # a two-way tie holding the truth: the expected score of a random pick
    assert abs(cons_at_k([[1, 2, 7]], [7]) - 1 / 3) < 1e-12
    assert cons_at_k([[7, 3, 3, None, None, None]], [3]) == 1.0  # unanswered samples do not vote
    assert cons_at_k([[None, None]], [7]) == 0.0
    assert cons_at_k([[7, 7], [1, 2], [5]], [7, 2, 4]) == pytest.approx((1 + 0.5 + 0) / 3)
    # The order of the samples never matters (no preference for the first one).
    assert cons_at_k([[3, 7]], [7]) == cons_at_k([[7, 3]], [7])
    with pytest.raises(ValueError):
        cons_at_k([[1]], [1, 2])


@pytest.mark.parametrize("text, kind, first", [
    ("59 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", "guess", 59),
    ("83-29=56 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", "step", 56),
    ("83-29=54 54+07=60 wait 54+07=61</think> <answer> 61 </answer>", "step", 60),
    ("83 minus 29 is 56 wait 83 minus 29 is 54 54 plus 07 is 61</think> <answer> 61 </answer>", "step", 56),
    ("61 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", None, None),  # a right guess, checked
    ("83-29=54 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", None, None),  # a right step, checked
    ("59 wait 83-29=55 55+07=62</think> <answer> 62 </answer>", None, None),  # corrected into a wrong answer
    ("59 wait 61</think> <answer> 61 </answer>", None, None),  # nothing recomputed
    ("83-29=54 54+07=61</think> <answer> 61 </answer>", None, None),  # no reflection
    ("</think> <answer> 61 </answer>", None, None),
    ("59 wait 83-29=54 54+07=61", None, None),  # no answer
    ("hello 59 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", None, None),  # before " wait " does not parse
    ("59 wait 83-29=54 54+07=61</think> <answer> 61 </answer> wait 3", "guess", 59),  # text after the answer
])
def test_find_aha_on_handmade_transcripts(text, kind, first):
    found = find_aha(text, P)
    assert (found.kind if found else None) == kind
    if found:
        assert found.first == first and found.first != found.should_be and found.final == P.answer


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), st.none(), st.integers(), st.binary(max_size=20)))
def test_find_aha_never_raises(junk):
    assert find_aha(junk, P) is None or isinstance(junk, str)


def handmade_samples() -> Samples:
    p2 = Problem((10, 5, 3, 1), ("+", "-", "+"))  # 10+05-03+01 = 13
    texts = [["59 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", "</think> <answer> 60 </answer>"],
             ["</think> <answer> 13 </answer>", "10+05=15 15-03=12 12+01=13</think> <answer> 13"]]
    return Samples([P, p2], texts, np.array([[20, 8], [8, 12]]), np.array([[False, False], [False, True]]))


def test_measure_on_handmade_samples():
    m = measure(handmade_samples())
    assert m["k"] == 2 and m["problems"] == 2
    assert m["pass@1"] == 0.5 and m["pass@k"] == 1.0
    assert m["cons@k"] == pytest.approx((0.5 + 1.0) / 2)  # problem 1: a tie of 61 and 60; problem 2: one vote, 13
    assert m["reflection_response"] == 0.25 and m["reflection_problem"] == 0.5  # per response vs per problem
    assert m["aha_response"] == 0.25 and m["truncated"] == 0.25 and m["format"] == 0.75
    assert m["length"] == 12.0 and m["length_right"] == 14.0 and m["length_wrong"] == 10.0
    assert m["by_ops"] == {2: 0.5, 3: 0.5}
    assert m["by_style"]["reflects"] == {"share": 0.25, "accuracy": 1.0}
    assert m["by_style"]["bare"]["share"] == 0.5 and m["by_style"]["bare"]["accuracy"] == 0.5
    json.dumps(m)  # JSON-able: it travels in checkpoints


def tiny_model(world: World) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2,
                                         max_seq_len=48))


def test_sample_k_shapes_seed_and_truncation():
    world = World(n_docs=10)
    model = tiny_model(world)
    problems = world.heldout[:3]
    a = sample_k(model, world, problems, 4, max_new_tokens=6, seed=3, batch_size=5)
    b = sample_k(model, world, problems, 4, max_new_tokens=6, seed=3, batch_size=5)
    assert len(a.texts) == 3 and all(len(row) == 4 for row in a.texts) and a.lengths.shape == (3, 4)
    assert a.texts == b.texts  # the same seed gives the same samples
    # An untrained model rarely closes </answer> within 6 tokens: those completions are truncated.
    closed = np.array([[t.endswith("</answer>") for t in row] for row in a.texts])
    assert np.array_equal(a.truncated, ~closed) and a.truncated.any()
    assert ((a.lengths == 6) | ~a.truncated).all()
    with pytest.raises(ValueError):
        sample_k(model, world, problems, 0)


def test_problems_with_ops():
    world = World(n_docs=10)
    held = {p.text for p in world.heldout}
    for n_ops in (1, 4):
        ps = problems_with_ops(world, n_ops, 30, seed=2)
        assert len(ps) == 30 and len({p.text for p in ps}) == 30 and all(len(p.ops) == n_ops for p in ps)
        assert not any(p.text in held for p in ps) and ps == problems_with_ops(world, n_ops, 30, seed=2)


def test_time_to_double():
    assert time_to_double([0.2, 0.2, 0.2, 0.3, 0.5, 0.6, 0.7], [1.0] * 7) == (6, 6.0)
    assert time_to_double([0.3, 0.3, 0.3, 0.3], [1.0] * 4) == (None, None)
    assert time_to_double([0.1], [1.0]) == (None, None)


def test_run_r1zero_checkpoints_and_resumes(tmp_path):
    world = World(n_docs=10)
    config = GRPOConfig(steps=4, prompts_per_step=2, group_size=2, max_new_tokens=8)
    probe = world.heldout[:2]
    full = run_r1zero(tiny_model(world), world, config, eval_problems=probe, eval_k=2,
                      checkpoint_dir=tmp_path / "full", checkpoint_every=2, progress=False)
    assert [e["step"] for e in full.evals] == [0, 2, 4] and [s for s, _ in full.checkpoints()] == [0, 2, 4]
    assert all(e["k"] == 2 and 0 <= e["pass@1"] <= 1 for e in full.evals)
    # Stop after step 2 (by deleting the later checkpoint), then resume: the same evaluations and log.
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "step-000004")
    again = run_r1zero(tiny_model(world), world, config, eval_problems=probe, eval_k=2,
                       checkpoint_dir=tmp_path / "cut", checkpoint_every=2, progress=False, resume=True)
    strip = lambda evs: json.dumps([{k: v for k, v in e.items() if k != "seconds"} for e in evs], sort_keys=True)
    assert strip(again.evals) == strip(full.evals)
    assert json.dumps({k: v for k, v in again.history.items() if k != "seconds"}, sort_keys=True) == json.dumps(
        {k: v for k, v in full.history.items() if k != "seconds"}, sort_keys=True)
