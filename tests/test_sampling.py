"""Unit tests of dslib.sampling: left padding leaves every row as it would be alone, the sampler's log-probabilities
equal a teacher-forced forward pass (Transformer, MLATransformer and DeepSeek-V3-mini), the cached engine matches the
uncached reference, stop tokens and sequences, max length, top-p, greedy decoding and seeds."""

from __future__ import annotations

import pytest
import torch

from dslib.mla import MLATransformer, MLATransformerConfig
from dslib.sampling import (generate, generate_uncached, left_pad, padded_attention, positions_of, rollout_logprobs,
                            top_p_filter)
from dslib.transformer import Transformer, TransformerConfig

V = 30
PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 4], [1, 3, 3, 3], [1, 9, 8]]


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=40,
                                         init_std=0.3)).eval()


def mla(seed: int = 0) -> MLATransformer:
    torch.manual_seed(seed)
    return MLATransformer(MLATransformerConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, kv_lora_rank=16,
                                               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=40,
                                               init_std=0.3)).eval()


def v3(seed: int = 0) -> torch.nn.Module:
    """DeepSeek-V3-mini (chapter 04), when that chapter's module is present: MLA attention and DeepSeekMoE layers."""
    v3_module = pytest.importorskip("dslib.v3")
    torch.manual_seed(seed)
    return v3_module.DeepSeekV3(v3_module.V3Config(vocab_size=V, max_position_embeddings=40)).eval()


MODELS = {"dense": dense, "mla": mla, "v3": v3}


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    assert positions_of(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    m = padded_attention(mask)
    assert m.shape == (2, 1, 3, 3) and m.any(-1).all()  # no empty softmax row
    assert not m[1, 0, 2, :2].any() and m[1, 0, 2, 2]  # the real token sees no padding
    with pytest.raises(ValueError):
        left_pad([[1], []], 0)


@pytest.mark.parametrize("kind", MODELS)
def test_logprobs_equal_teacher_forced(kind):
    model = MODELS[kind]()
    for temperature in (1.0, 0.7):
        r = generate(model, PROMPTS, 20, temperature=temperature, stop_ids=[2], seed=3)
        tf = rollout_logprobs(model, r, temperature)
        assert torch.allclose(tf, r.logprobs, atol=1e-5)
        assert (r.logprobs[~r.mask] == 0).all() and (r.logprobs[r.mask] < 0).all()


@pytest.mark.parametrize("kind", MODELS)
def test_padded_rows_equal_alone(kind):
    model = MODELS[kind]()
    r = generate(model, PROMPTS, 12, seed=5)
    for i, p in enumerate(PROMPTS):
        n = int(r.mask[i].sum())
        ids = torch.tensor([p + r.tokens[i, :n].tolist()])
        with torch.no_grad():
            lp = model(ids)[0].log_softmax(-1)[len(p) - 1:len(p) - 1 + n]
        alone = lp.gather(-1, r.tokens[i, :n, None])[:, 0]
        assert torch.allclose(alone, r.logprobs[i, :n], atol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_cached_equals_uncached(kind):
    model = MODELS[kind]()
    a = generate(model, PROMPTS, 15, stop_ids=[2, 3], seed=7)
    b = generate_uncached(model, PROMPTS, 15, stop_ids=[2, 3], seed=7)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_stop_tokens_and_masks():
    model = dense()
    r = generate(model, PROMPTS * 8, 30, stop_ids=[2, 3, 4], seed=0)
    for row, m in zip(r.tokens, r.mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # the mask is a prefix
        stops = [j for j in range(n) if int(row[j]) in (2, 3, 4)]
        assert stops in ([], [n - 1])  # a stop token ends the completion and is kept
        assert (row[n:] == 0).all()
        if not stops:
            assert n == r.tokens.shape[1]


def test_max_length_is_capped_by_context():
    model = dense()
    r = generate(model, PROMPTS, 100, seed=0)
    assert r.sequences.shape[1] == model.config.max_seq_len
    with pytest.raises(ValueError):
        generate(model, [[1] * 40], 5)


def test_seed_reproducible_and_greedy():
    model = dense()
    a, b = generate(model, PROMPTS, 10, seed=11), generate(model, PROMPTS, 10, seed=11)
    c = generate(model, PROMPTS, 10, seed=12)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    g = generate(model, PROMPTS, 10, temperature=0)
    with torch.no_grad():
        x = torch.tensor([PROMPTS[0]])
        want = model.generate(x, 10, temperature=0)[0, len(PROMPTS[0]):]
    assert torch.equal(g.tokens[0], want) and (g.logprobs == 0).all()


def test_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    model = dense()
    r = generate(model, PROMPTS * 4, 10, top_p=0.3, seed=0)
    full = rollout_logprobs(model, r)
    assert (r.logprobs >= full - 1e-6).all()  # renormalised over the nucleus: never less likely
    with pytest.raises(ValueError):
        generate(model, PROMPTS, 5, top_p=0.0)


def test_stop_sequences():
    model = dense()
    free = generate(model, PROMPTS, 20, seed=4)
    row = free.tokens[0].tolist()
    seq = row[5:7]  # a pair of tokens the first row is known to emit at positions 5-6
    r = generate(model, PROMPTS, 20, stop_sequences=[seq], seed=4)
    n = int(r.mask[0].sum())
    assert n <= 7 and r.tokens[0, n - 2:n].tolist() == seq
    assert r.tokens[0, :n].tolist() == row[:n]  # the same draws up to the stop
    for i in range(len(PROMPTS)):  # every row stops at the first occurrence of the sequence, or runs to the end
        toks = r.tokens[i, :int(r.mask[i].sum())].tolist()
        hits = [j for j in range(1, len(toks)) if toks[j - 1:j + 1] == seq]
        assert hits in ([], [len(toks) - 1])
    with pytest.raises(ValueError):
        generate(model, PROMPTS, 5, stop_sequences=[[]])


@pytest.mark.parametrize("kind", ["dense", "mla", "v3"])
def test_dropping_finished_rows_keeps_the_samples(kind):
    """Rows that stop leave the batch and the cache; every live row still draws the same random numbers, so the
    samples equal those of the engine that keeps every row to the end."""
    model = MODELS[kind]()
    prompts = PROMPTS * 6
    kept = generate(model, prompts, 20, stop_ids=[2, 3, 4], seed=5, drop_finished=False)
    dropped = generate(model, prompts, 20, stop_ids=[2, 3, 4], seed=5, drop_finished=True)
    assert kept.lengths.min() < kept.lengths.max()  # some rows finished early, so rows were dropped
    assert torch.equal(kept.tokens, dropped.tokens) and torch.equal(kept.mask, dropped.mask)
    assert torch.allclose(kept.logprobs, dropped.logprobs, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "mla", "v3"])
def test_logits_to_keep_is_the_last_positions(kind):
    model = MODELS[kind]()
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        full = full[0] if isinstance(full, tuple) else full
        for k in (1, 4):
            last = model(ids, logits_to_keep=k)
            assert last.shape == (3, k, V) and torch.allclose(last, full[:, -k:], atol=1e-6)
        assert torch.equal(model(ids, logits_to_keep=0), full)
