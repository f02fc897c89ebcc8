# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/05_grpo.py (chapter 05).
# Edit the chapter, then run the export again.

"""Batched, KV-cached generation for dslib models: prompts of different lengths, temperature and top-p, stop tokens,
the sampling policy's per-token log-probabilities and completion masks (chapter 05)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    """A batch of generated completions, left-padded prompts first.

    prompt_ids (b, P): prompts, left-padded with pad_id to the longest; prompt_mask (b, P) is True on real tokens.
    tokens (b, N): the completions; after a stop token (which is kept) the row holds pad_id.
    logprobs (b, N): log-probability of each completion token under the distribution it was sampled from (after
        temperature and top-p; 0 for greedy decoding); 0 where mask is False.
    mask (b, N): True on completion tokens (up to and including the stop token).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Completion lengths in tokens (b,)."""
        return self.mask.sum(-1)

    def truncated(self, stop_ids: Sequence[int]) -> torch.Tensor:
        """(b,) bool: the completion ends without a stop token (it hit the length limit)."""
        last = self.tokens.gather(1, (self.lengths - 1).clamp(min=0)[:, None])[:, 0]
        return ~torch.isin(last, torch.as_tensor(list(stop_ids), dtype=last.dtype, device=last.device))

    @property
    def sequences(self) -> torch.Tensor:
        """Prompt and completion side by side (b, P + N)."""
        return torch.cat([self.prompt_ids, self.tokens], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """True on the real tokens of `sequences` (b, P + N)."""
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def texts(self, tokenizer) -> list[str]:
        """The completions as text (pads dropped, the stop token kept)."""
        return [tokenizer.decode(row[m].tolist()) for row, m in zip(self.tokens, self.mask)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (ids (b, P), mask (b, P)), right-aligned: every prompt ends at column P-1."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt, and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def padded_attention(valid: torch.Tensor, past: int = 0, valid_past: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean attention mask (b, 1, t, past + t) for a chunk of t tokens after `past` cached ones, where
    valid (b, t) and valid_past (b, past) mark real tokens: a query sees earlier-or-equal real keys only. A padding
    query sees itself only (so no row of the softmax is empty; padding outputs are never read)."""
    b, t = valid.shape
    keys = valid if valid_past is None else torch.cat([valid_past, valid], dim=1)  # (b, past + t)
    causal = torch.ones(t, past + t, dtype=torch.bool, device=valid.device).tril(past)
    allowed = causal[None] & keys[:, None, :]
    diag = torch.zeros(t, past + t, dtype=torch.bool, device=valid.device)
    diag[torch.arange(t), past + torch.arange(t)] = True
    return (allowed | (diag[None] & ~valid[:, :, None]))[:, None]


def positions_of(valid: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """RoPE positions of real tokens counted from `start` (b,) or an int; padding gets position 0."""
    pos = valid.long().cumsum(-1) - 1
    if isinstance(start, torch.Tensor):
        pos = pos + start[:, None]
    else:
        pos = pos + start
    return torch.where(valid, pos, torch.zeros_like(pos))


def context_limit(model: torch.nn.Module, default: int) -> int:
    """The longest sequence a model takes: its config's max_seq_len (Transformer, MLATransformer) or
    max_position_embeddings (DeepSeek-V3's name), else `default`."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose probability reaches top_p (the
    most likely token always stays); the others get -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: a positive int is required")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: a non-negative number is required")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: a number in (0, 1] is required")


def _stop_tensors(stop_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]],
                  device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    sequences = [torch.as_tensor(list(q), dtype=torch.long, device=device) for q in stop_sequences]
    if any(len(q) == 0 for q in sequences):
        raise ValueError("stop_sequences must not contain an empty sequence")
    return stops, sequences


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0, seed: int | None = 0,
             generator: torch.Generator | None = None, drop_finished: bool = True) -> Rollout:
    """Sample completions of token-id prompts of different lengths, in one batch, with a KV cache.

    The model is any dslib LM with `forward(input_ids, positions, segments, attn_mask, cache)` and
    `new_cache(batch_size, max_len)` (Transformer, MLATransformer). Prompts are left-padded; padding is kept out of
    attention by an explicit mask and out of RoPE by explicit positions, so every row computes what it would alone.

    temperature 0 is greedy, else softmax(logits / temperature) within the top_p nucleus. A row ends after a token of
    stop_ids, or once its completion ends with one of stop_sequences (token-id lists); both are kept. max_new_tokens is
    capped by the model's max_seq_len. seed: a fresh generator (same seed, same rollout), or pass `generator`.
    drop_finished: stopped rows leave the batch and the cache (when it has `select_rows`); the samples are the same.
    Returns a Rollout whose logprobs are those of the distribution sampled from (with top_p = 1, a teacher-forced
    forward pass's at the same temperature: what GRPO's ratio pi_theta / pi_theta_old needs).
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, valid = left_pad(prompts, pad_id, device)
    b, width = ids.shape
    limit = context_limit(model, width + max_new_tokens)
    n_new = min(max_new_tokens, limit - width)
    if n_new < 1:
        raise ValueError(f"the longest prompt has {width} tokens: no room to generate within max_seq_len={limit}")
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    stops, sequences = _stop_tensors(stop_ids, stop_sequences, device)
    prompt_len = valid.sum(-1)  # (b,)

    cache = model.new_cache(b, width + n_new)
    can_drop = drop_finished and hasattr(cache, "select_rows")
    rows = torch.arange(b, device=device)  # the rows of the batch that the cache still holds
    # The prefill needs the output head at the last position only (dslib models take logits_to_keep).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(ids, positions=positions_of(valid), attn_mask=padded_attention(valid), cache=cache, **keep)[:, -1]
    key_valid = torch.cat([valid, torch.ones(b, n_new, dtype=torch.bool, device=device)], dim=1)
    tokens = torch.full((b, n_new), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, n_new, device=device)
    mask = torch.zeros(b, n_new, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    for i in range(n_new):
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)
            lp = torch.zeros(b, device=device)
        else:
            logp = top_p_filter(logits / temperature, top_p).log_softmax(-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            lp = logp.gather(-1, nxt[:, None])[:, 0]
        live = ~done
        tokens[:, i] = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        logprobs[:, i] = torch.where(live, lp, torch.zeros_like(lp))
        mask[:, i] = live
        steps = i + 1
        if len(stops):
            done = done | (live & torch.isin(nxt, stops))
        for q in sequences:  # the completion now ends with the sequence
            if i + 1 >= len(q):
                done = done | (live & (tokens[:, i + 1 - len(q):i + 1] == q).all(-1))
        if bool(done.all()) or i + 1 == n_new:
            break
        # Rows that have finished leave the batch (their cache rows too) once a quarter of it is idle; sampling still
        # draws for all b rows, so every live row gets the same random numbers as without dropping.
        live_rows = ~done[rows]
        if can_drop and int(live_rows.sum()) <= 0.75 * len(rows):
            rows = rows[live_rows]
            cache.select_rows(torch.nonzero(live_rows)[:, 0])
        past = width + i
        out = model(tokens[rows, i:i + 1], positions=(prompt_len[rows] + i)[:, None],
                    attn_mask=key_valid[rows][:, None, None, :past + 1], cache=cache)[:, -1]
        logits = out if len(rows) == b else torch.zeros(b, out.shape[-1], device=device, dtype=out.dtype).index_copy_(
            0, rows, out)
    model.train(was_training)
    return Rollout(ids, valid, tokens[:, :steps], logprobs[:, :steps], mask[:, :steps])


def sequence_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced log-probabilities (b, N) of completion tokens after left-padded prompts, in one forward pass
    (with gradients when enabled): log softmax(logits / temperature) at each completion token, 0 where mask is False.
    This is log pi_theta(o_t | q, o_<t) of GRPO's objective (DeepSeekMath, eq. 3)."""
    ids = torch.cat([prompt_ids, tokens], dim=1)
    valid = torch.cat([prompt_mask, mask], dim=1)
    logits = model(ids, positions=positions_of(valid), attn_mask=padded_attention(valid))
    width = prompt_ids.shape[1]
    logits = logits[:, width - 1:-1].float()  # the logits that predict each completion token
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return lp.masked_fill(~mask, 0.0)


def rollout_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0,
                     bucket: int | None = 64) -> torch.Tensor:
    """`sequence_logprobs` of a Rollout's completions under `model` (the new policy, or the reference model).

    bucket: rows are sorted by completion length and run in chunks of this many, each cut to its longest completion,
    so that short completions do not pay for the longest one's padding (the result is the same, and differentiable;
    None runs one pass)."""
    b, n = rollout.tokens.shape
    if bucket is None or b <= bucket:
        return sequence_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask,
                                 temperature)
    order = rollout.lengths.argsort()
    pieces = []
    for s in range(0, b, bucket):
        rows = order[s:s + bucket]
        width = max(1, int(rollout.lengths[rows].max()))
        lp = sequence_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                               rollout.tokens[rows, :width], rollout.mask[rows, :width], temperature)
        pieces.append(F.pad(lp, (0, n - width)))
    return torch.cat(pieces)[order.argsort()]


@torch.no_grad()
def generate_uncached(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                      temperature: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                      seed: int | None = 0) -> Rollout:
    """The slow, obvious reference: the same sampling, but every step runs the whole sequence again (no KV cache).
    Given the same seed it draws the same tokens as `generate` (top_p = 1), up to float rounding."""
    device = next(model.parameters()).device
    model.eval()
    ids, valid = left_pad(prompts, pad_id, device)
    b, width = ids.shape
    n_new = min(max_new_tokens, context_limit(model, width + max_new_tokens) - width)
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    seq, seq_valid = ids, valid
    toks, lps, masks = [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(n_new):
        logits = model(seq, positions=positions_of(seq_valid), attn_mask=padded_attention(seq_valid))[:, -1].float()
        if temperature == 0:
            nxt, lp = logits.argmax(-1), torch.zeros(b, device=device)
        else:
            logp = (logits / temperature).log_softmax(-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
            lp = logp.gather(-1, nxt[:, None])[:, 0]
        live = ~done
        toks.append(torch.where(live, nxt, torch.full_like(nxt, pad_id)))
        lps.append(torch.where(live, lp, torch.zeros_like(lp)))
        masks.append(live)
        if len(stops):
            done = done | (live & torch.isin(nxt, stops))
        seq = torch.cat([seq, toks[-1][:, None]], dim=1)
        seq_valid = torch.cat([seq_valid, torch.ones_like(live)[:, None]], dim=1)  # a pad after a stop is harmless
        if bool(done.all()):
            break
    return Rollout(ids, valid, torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(masks, 1))
