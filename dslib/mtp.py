# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/04_v3.py (chapter 04).
# Edit the chapter, then run the export again.

"""Multi-Token Prediction (MTP) of DeepSeek-V3 (arXiv 2412.19437, section 2.2): D sequential modules that each predict
one more future token, sharing the main model's embedding and output head; their training loss; and greedy
speculative decoding with the first module as the draft (chapter 04)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dslib.train import masked_lm_loss
from dslib.transformer import RMSNorm


class MTPModule(nn.Module):
    """MTP module k (V3, section 2.2, equations 21-23):

        h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]     (eh_proj, enorm, hnorm)
        h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                              (block: one transformer block of the main kind)
        P^k_{i+k+1} = OutHead(norm(h^k_i))                             (norm here, head shared with the main model)

    The paper writes the concatenation as [h; Emb]. The layout here is the released checkpoint's, as the serving
    engines that run its MTP layer (vLLM's and SGLang's DeepSeek MTP models) read it: eh_proj multiplies
    [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)], the embedding first. The order is only a permutation of M_k's columns; we
    follow the weights. For module 1, h^0_i is the main model's last-layer output before its final norm (what
    DeepSeekV3.forward returns with return_hidden=True); for module k > 1, module k-1's block output.
    `block(x, cos, sin, mask, cache, **kwargs)` is a block of the main model's kind (dslib.v3.V3Block here)."""

    def __init__(self, d_model: int, block: nn.Module, norm_eps: float = 1e-6):
        super().__init__()
        self.enorm = RMSNorm(d_model, norm_eps)
        self.hnorm = RMSNorm(d_model, norm_eps)
        self.eh_proj = nn.Linear(2 * d_model, d_model, bias=False)  # M_k, d x 2d
        self.block = block
        self.norm = RMSNorm(d_model, norm_eps)  # the reference's shared_head.norm: the head itself is the main one

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache=None, **block_kwargs) -> torch.Tensor:
        """h_prev (b, n, d): h^{k-1} at positions i; emb_next (b, n, d): Emb(t_{i+k}). Returns h^k (b, n, d)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin, mask, cache, **block_kwargs)


def mtp_hidden(modules: nn.ModuleList, embed: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run the D modules in sequence over a whole sequence (training): depth k sees positions i = 0 .. T-1-k, combines
    h^{k-1}_i with Emb(t_{i+k}) and returns h^k_i, which predicts t_{i+k+1}. The causal chain is kept at every depth:
    h^k_i depends on tokens up to t_{i+k} only. Returns [h^1 (b, T-1, d), ..., h^D (b, T-D, d)]."""
    t = input_ids.shape[1]
    out, h = [], hidden
    for k, module in enumerate(modules, start=1):
        n = t - k
        if n <= 0:
            raise ValueError(f"MTP depth {k} needs sequences longer than {k} tokens; got {t}")
        m = mask[..., :n, :n] if mask is not None else None
        h = module(h[:, :n], embed(input_ids[:, k:k + n]), cos[:, :n], sin[:, :n], m)
        out.append(h)
    return out


def mtp_targets(batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and loss mask of depth k for a packed batch (dslib.world.PackedData): at position i the target is
    t_{i+k+1} = targets[i+k], counted when it is a response token (loss_mask[i+k]) of the same document as position i
    (segments equal), so no module is trained to predict across a document boundary."""
    targets, mask, seg = batch["targets"], batch["loss_mask"], batch["segments"]
    n = targets.shape[1] - k
    return targets[:, k:], mask[:, k:] & (seg[:, k:] == seg[:, :n])


def mtp_loss(model: nn.Module, batch: dict[str, torch.Tensor], lam: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    list[torch.Tensor]]:
    """V3's training objective on a packed batch: the main next-token loss plus L_MTP = lam / D * sum_k L^k
    (V3, equation 25), each L^k the mean cross-entropy of depth k over its counted targets.
    `model` must expose its hidden states: model(..., return_hidden=True) -> (logits, h) and model.mtp_logits(...)
    (dslib.v3.DeepSeekV3 does). Returns (total, main loss, [L^1, ..., L^D])."""
    logits, hidden = model(batch["input_ids"], positions=batch["positions"], segments=batch["segments"],
                           return_hidden=True)
    main = masked_lm_loss(logits, batch["targets"], batch["loss_mask"])
    depth_losses = []
    for k, lk in enumerate(model.mtp_logits(batch["input_ids"], hidden, positions=batch["positions"],
                                            segments=batch["segments"]), start=1):
        tk, mk = mtp_targets(batch, k)
        depth_losses.append(masked_lm_loss(lk, tk, mk))
    total = main + (lam / len(depth_losses)) * sum(depth_losses) if depth_losses else main
    return total, main, depth_losses


@dataclass
class SpeculativeStats:
    """What speculative decoding did: forward passes of the main model, tokens produced, drafts proposed and kept,
    and for each produced token whether it came from an accepted draft."""

    forwards: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    marks: list = field(default_factory=list)  # (token id, "main" | "accepted" | "rejected draft id")

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, self.forwards)


@torch.no_grad()
def speculative_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         stop_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of one sequence (1, t0) with MTP module 1 as the draft (V3, section 5.4.3): each main-model
    forward checks the drafted token and, when the main model agrees, keeps it and also yields the token after it.
    The output equals plain greedy decoding exactly; only the number of main-model forwards changes.

    Each step feeds [t, d] (the main model's token t and the draft d) at once. If the main model's prediction after t
    is d, both are kept and the prediction after d is free; otherwise d's cache entry is dropped (the cache length
    goes back one) and the main model's own prediction is used."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence at a time; got a batch of {input_ids.shape[0]}")
    if not len(model.mtp):
        raise ValueError("the model has no MTP module (num_nextn_predict_layers=0): nothing can draft")
    model.eval()
    t0 = input_ids.shape[1]
    max_len = min(model.config.max_position_embeddings, t0 + max_new_tokens + 1)
    cache, mcache = model.new_cache(1, max_len), model.new_mtp_cache(1, max_len)
    stats = SpeculativeStats()
    logits, h = model(input_ids, cache=cache, return_hidden=True)
    stats.forwards += 1
    nxt = int(logits[0, -1].argmax())
    out = input_ids[0].tolist() + [nxt]
    stats.marks.append((nxt, "main"))
    # MTP over the prompt: position i combines h_i with the token after it (the last one with the new token).
    draft = model.mtp_draft(h, torch.tensor([out[1:]], device=input_ids.device), mcache)
    while len(out) - t0 < max_new_tokens and nxt != stop_id and len(out) + 1 <= max_len:
        pair = torch.tensor([[nxt, draft]], device=input_ids.device)
        logits, h = model(pair, cache=cache, return_hidden=True)
        stats.forwards += 1
        stats.drafted += 1
        pred = logits[0].argmax(-1).tolist()  # pred[0]: after nxt; pred[1]: after the draft
        if pred[0] == draft and draft == stop_id:  # the draft is right and ends the answer
            stats.accepted += 1
            out.append(draft)
            stats.marks.append((draft, "accepted"))
            break
        if pred[0] == draft:
            stats.accepted += 1
            out += [draft, pred[1]]
            stats.marks += [(draft, "accepted"), (pred[1], "main")]
            nxt = pred[1]
            draft = model.mtp_draft(h, torch.tensor([[draft, nxt]], device=input_ids.device), mcache)
        else:
            cache.length -= 1  # forget the rejected draft's keys and values
            stats.marks.append((pred[0], f"rejected {draft}"))
            out.append(pred[0])
            nxt = pred[0]
            draft = model.mtp_draft(h[:, :1], torch.tensor([[nxt]], device=input_ids.device), mcache)
    gen = out[t0:]
    if stop_id is not None and stop_id in gen:
        gen = gen[:gen.index(stop_id) + 1]
    gen = gen[:max_new_tokens]
    stats.tokens, stats.marks = len(gen), stats.marks[:len(gen)]
    return torch.tensor([out[:t0] + gen], device=input_ids.device), stats
