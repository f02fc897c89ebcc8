"""dslib.mtp: targets and offsets, the loss, causality, and speculative decoding."""

import pytest
import torch

from dslib.mtp import mtp_hidden, mtp_loss, mtp_targets, speculative_generate
from dslib.v3 import DeepSeekV3, V3Config

V = 104


def model(depth=1, seed=0, **kw):
    torch.manual_seed(seed)
    c = V3Config(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=depth,
                 max_position_embeddings=64, **kw)
    return DeepSeekV3(c)


def packed_batch():
    # Two documents in one row: tokens 10..17 (doc 1) and 30..35 (doc 2); targets are the next tokens.
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17, 30, 31, 32, 33, 34, 35]])
    targets = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 0, 31, 32, 33, 34, 35, 36]])
    seg = torch.tensor([[1] * 8 + [2] * 6])
    loss_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([list(range(8)) + list(range(6))])
    return dict(input_ids=ids, targets=targets, segments=seg, loss_mask=loss_mask, positions=positions)


def test_targets_and_offsets():
    b = packed_batch()
    t1, m1 = mtp_targets(b, 1)
    # depth 1 at position i predicts the token two ahead: at 0 (token 10) it is 12
    assert t1[0, 0] == 12 and t1[0, 5] == 17 and bool(m1[0, 5])
    assert not m1[0, 6]  # position 6 (token 16): two ahead is 30, in the next document
    assert not m1[0, 7]  # position 7 (token 17): its target slot crosses the boundary too
    assert t1[0, 8] == 32 and bool(m1[0, 8])
    t2, m2 = mtp_targets(b, 2)
    assert t2.shape[1] == 12 and t2[0, 0] == 13 and not m2[0, 5] and bool(m2[0, 4])


def test_loss_is_main_plus_weighted_depths():
    m = model(depth=2)
    b = packed_batch()
    total, main, depths = mtp_loss(m, b, lam=0.3)
    assert len(depths) == 2
    assert torch.allclose(total, main + 0.3 / 2 * (depths[0] + depths[1]))
    total0, main0, _ = mtp_loss(m, b, lam=0.0)
    assert torch.allclose(total0, main0)
    total.backward()
    assert m.mtp[1].eh_proj.weight.grad is not None and m.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_depth_loss_against_a_slow_loop():
    m = model(depth=1).eval()
    b = packed_batch()
    _, _, (l1,) = mtp_loss(m, b, lam=1.0)
    logits, h = m(b["input_ids"], positions=b["positions"], segments=b["segments"], return_hidden=True)
    lk = m.mtp_logits(b["input_ids"], h, positions=b["positions"], segments=b["segments"])[0]
    ids, seg = b["input_ids"][0].tolist(), b["segments"][0].tolist()
    losses = []
    for i in range(len(ids) - 2):
        if seg[i + 2] == seg[i]:  # the token two ahead, in the same document
            losses.append(torch.nn.functional.cross_entropy(lk[0, i], torch.tensor(ids[i + 2])))
    # the row's last position (target 36, beyond input_ids) counts too
    losses.append(torch.nn.functional.cross_entropy(lk[0, len(ids) - 2], torch.tensor(36)))
    assert torch.allclose(l1, torch.stack(losses).mean(), atol=1e-6)


def test_mtp_is_causal():
    m = model(depth=2).eval()
    ids = torch.randint(0, V, (1, 24))
    changed = ids.clone()
    j = 15
    changed[0, j] = (changed[0, j] + 1) % V
    cos, sin = m.rope(torch.arange(24)[None])
    with torch.no_grad():
        ha = mtp_hidden(m.mtp, m.embed, ids, m(ids, return_hidden=True)[1], cos, sin)
        hb = mtp_hidden(m.mtp, m.embed, changed, m(changed, return_hidden=True)[1], cos, sin)
    for k, (a, b) in enumerate(zip(ha, hb), start=1):
        # h^k_i reads tokens up to i + k. Not bitwise: the experts' grouped products see other tokens in other groups
        assert (a[:, :j - k] - b[:, :j - k]).abs().max() < 1e-5
        assert (a[:, j - k] - b[:, j - k]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_equals_greedy(seed):
    m = model(seed=seed).eval()
    prompt = torch.randint(0, V, (1, 6))
    stop = 7
    plain = m.generate(prompt, 30, stop_id=stop)[0].tolist()
    if stop in plain[6:]:
        plain = plain[:plain.index(stop, 6) + 1]
    spec, stats = speculative_generate(m, prompt, 30, stop_id=stop)
    assert spec[0].tolist() == plain
    assert stats.tokens == len(plain) - 6
    assert stats.forwards <= stats.tokens and stats.accepted <= stats.drafted
    assert len(stats.marks) == stats.tokens


def test_speculative_accepts_a_perfect_draft():
    # With every weight zero, the main model and the draft both predict token 0 (argmax of equal logits) everywhere:
    # every draft is accepted, and each forward pass after the first yields two tokens.
    m = model().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    spec, stats = speculative_generate(m, torch.tensor([[1, 2, 3]]), 11)
    assert spec[0, 3:].tolist() == [0] * 11
    assert stats.acceptance == 1.0 and stats.forwards == 6 and stats.tokens == 11


def test_speculative_errors():
    with pytest.raises(ValueError, match="no MTP"):
        speculative_generate(model(depth=0), torch.tensor([[1, 2]]), 5)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(model(), torch.tensor([[1, 2], [3, 4]]), 5)
