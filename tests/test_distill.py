"""Unit tests of dslib.distill (chapter 08): the FLOP counts against a count by hand and a loop, the distillation KL
against torch.nn.functional.kl_div and a two-token hand computation, the teacher-data filter, and both distillation
routes on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dslib.distill import (DistillConfig, distill_logits, distill_sft, fresh_problems, generation_flops, kd_loss,
                           linear_params, packed_train_flops, sequence_flops, teacher_data, token_flops, train_flops)
from dslib.r1 import keep_sample
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import PackedData, World, prompt

HAND = TransformerConfig(vocab_size=10, d_model=4, n_layer=1, n_head=2, n_kv_head=1, intermediate_size=8)


def test_flops_against_a_hand_count():
    # q, o: 4x4 each; k, v: 4 x (1 KV head x width 2) each; MLP 3 x 4 x 8; head 4 x 10.
    assert linear_params(HAND) == 2 * 16 + 2 * 8 + 96 + 40 == 184
    assert token_flops(HAND, 1) == 2 * 184 + 4 * 4 and token_flops(HAND, 3) == 416
    assert sequence_flops(HAND, 1) == token_flops(HAND, 1)
    assert sequence_flops(HAND, 6) == sum(token_flops(HAND, c) for c in range(1, 7))
    assert train_flops(HAND, 6) == 3 * sequence_flops(HAND, 6)
    # One sampling step: a prefill of 5 tokens yields the first new token; 3 more need 3 single-token steps.
    assert generation_flops(HAND, 5, 4) == sequence_flops(HAND, 5) + token_flops(HAND, 6) + token_flops(HAND, 7) \
        + token_flops(HAND, 8)
    assert generation_flops(HAND, 5, 1) == sequence_flops(HAND, 5) and generation_flops(HAND, 5, 0) == 0.0
    cfg = TransformerConfig(vocab_size=104, d_model=96, n_layer=4, n_head=4)
    loop = sequence_flops(cfg, 30) + sum(token_flops(cfg, 30 + j) for j in range(1, 40))
    assert math.isclose(generation_flops(cfg, 30, 40), loop, rel_tol=1e-12)
    gqa = TransformerConfig(vocab_size=104, d_model=64, n_layer=3, n_head=4, n_kv_head=2)
    assert linear_params(gqa) < linear_params(TransformerConfig(vocab_size=104, d_model=64, n_layer=3, n_head=4))


def test_packed_train_flops_counts_each_document():
    w = World(n_docs=50)
    texts = [d.text for d in w.corpus()[:20]]
    data = PackedData(texts, w.tokenizer, 96, 2, seed=0)
    seg = data.batch(0)["segments"]
    lengths = [int((row == s).sum()) for row in seg for s in row.unique().tolist() if s > 0]
    assert packed_train_flops(HAND, data, 1) == pytest.approx(sum(train_flops(HAND, n) for n in lengths))


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_kd_loss_equals_kl_div(tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    s, t = torch.randn(2, 7, 13, generator=g), torch.randn(2, 7, 13, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.4
    ref = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kd_loss(s, t, mask, tau), tau ** 2 * ref[mask].mean(), atol=1e-6)
    assert float(kd_loss(t, t, mask, tau)) == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher


def test_kd_loss_by_hand_and_validation():
    two = kd_loss(torch.log(torch.tensor([[[0.5, 0.5]]])), torch.log(torch.tensor([[[0.8, 0.2]]])),
                  torch.ones(1, 1, dtype=torch.bool), 1.0)
    assert float(two) == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)


@pytest.fixture
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = World(n_docs=200, prompt_en_rate=0.5)
    make = lambda d, kv: Transformer(TransformerConfig(vocab_size=w.tokenizer.vocab_size, d_model=d, n_layer=1,
                                                       n_head=2, n_kv_head=kv, max_seq_len=128)).eval()
    yield make(16, 2), make(8, 1), w
    torch.set_num_threads(threads)


def test_teacher_data_keeps_only_what_the_filter_keeps(tiny):
    teacher, _, w = tiny
    problems = fresh_problems(w, 20, seed=3)
    assert problems == fresh_problems(w, 20, seed=3) and {p.language for p in problems} == {"sym", "en"}
    held = {(p.operands, p.ops) for p in w.heldout}
    assert not any((p.operands, p.ops) in held for p in problems)
    data = teacher_data(teacher, w, problems, 3, seed=0, max_new_tokens=8)
    assert data.sampled == 60 and data.problems == 20 and len(data.prompt_tokens) == len(data.new_tokens) == 60
    assert 0.0 <= data.acceptance <= 1.0 and len(data.texts) <= data.kept_samples
    by_prompt = {prompt(p): p for p in problems}
    for t in data.texts:
        p = by_prompt[t.split("<think>", 1)[0] + "<think>"]
        assert keep_sample(t[len(prompt(p)):], p)
    # A teacher that always answers right in the problem's language: everything is kept.
    perfect = [prompt(p) + f"</think> <answer> {p.fmt(p.answer)} </answer>" for p in problems]
    assert all(keep_sample(t[len(prompt(p)):], p) for t, p in zip(perfect, problems))


def test_both_distillation_routes_train_a_copy(tiny):
    teacher, student, w = tiny
    texts = [prompt(p) + f"</think> <answer> {p.fmt(p.answer)} </answer>" for p in fresh_problems(w, 40)]
    cfg = DistillConfig(steps=3, batch=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    a = distill_sft(student, texts, w, cfg, progress=False)
    b, losses = distill_logits(student, teacher, texts, w, cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student is unchanged
    assert len(losses) == 3 and all(x >= 0 for x in losses)
    for trained in (a, b):  # each route changed its copy
        assert any(not torch.equal(x, y) for x, y in zip(trained.parameters(), student.parameters()))
    b2, losses2 = distill_logits(student, teacher, texts, w, cfg, progress=False)
    assert losses == losses2  # deterministic
