"""Decoding speed of Multi-head Latent Attention against multi-head attention (chapter 03).

Contenders, in one process, at the same width and number of heads, decoding a batch of 8 sequences after a context
of 4096 tokens:
- MHA: dslib.transformer.Transformer with its KVCache (keys and values of every head);
- GQA: the same Transformer with n_head / 4 key-value heads (each serves 4 query heads; the cache is read in place,
  not repeated per query head);
- MLA absorbed: dslib.mla.MLATransformer, mode "absorb" (attends to the cached latents directly);
- MLA naive: the same model and cache, mode "naive" (decompresses keys and values of every cached token each step).

MLA takes DeepSeek-V2's proportions: latent d_c = 4 d_h, RoPE key d_h^R = d_h / 2. Every contender prefills the same
random prefix and then decodes the same tokens (teacher-forced, so all compute the same steps); naive and absorbed MLA
must give the same logits. Steps are timed in alternating rounds, and the median round counts. Prints tokens per second,
cache bytes and ratios; the last line is the headline ratio.

    python benchmarks/mla_decode.py [--context 4096] [--batch 8] [--d-model 512] [--n-head 16] [--n-layer 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dslib
from dslib.mla import MLATransformer, MLATransformerConfig, kv_cache_bytes
from dslib.transformer import KVCache, Transformer, TransformerConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="decoding steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    device = dslib.setup(seed=0, threads=args.threads, quiet=True)
    ctx, b, d, h, n_layer = args.context, args.batch, args.d_model, args.n_head, args.n_layer
    dh, vocab = d // h, 256
    total = ctx + args.steps + 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; batch {b}, context {ctx}, "
          f"width {d}, {h} heads of {dh}, {n_layer} layers")

    torch.manual_seed(0)
    mha = Transformer(TransformerConfig(vocab_size=vocab, d_model=d, n_layer=n_layer, n_head=h, max_seq_len=total))
    mla_cfg = MLATransformerConfig(vocab_size=vocab, d_model=d, n_layer=n_layer, n_head=h, kv_lora_rank=4 * dh,
                                   qk_nope_head_dim=dh, qk_rope_head_dim=dh // 2, v_head_dim=dh, max_seq_len=total)
    mla = MLATransformer(mla_cfg)
    n_kv = max(1, h // 4)
    gqa = Transformer(TransformerConfig(vocab_size=vocab, d_model=d, n_layer=n_layer, n_head=h, n_kv_head=n_kv,
                                        max_seq_len=total))
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (b, ctx), generator=gen).to(device)
    steps = torch.randint(0, vocab, (b, args.steps), generator=gen).to(device)

    caches = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        mha.to(device).eval()
        caches["MHA"] = KVCache(mha.config, b, total, device=device)
        mha(prefix, cache=caches["MHA"])
        gqa.to(device).eval()
        caches["GQA"] = KVCache(gqa.config, b, total, device=device)
        gqa(prefix, cache=caches["GQA"])
        mla.to(device).eval()
        mla.mode = "naive"  # prefill through the fused attention kernel; both modes read the same cache
        caches["MLA"] = mla.new_cache(b, total)
        mla(prefix, cache=caches["MLA"])
    print(f"prefill of {b} x {ctx} tokens for the three models: {time.perf_counter() - t0:.1f} s")

    def sync() -> None:  # GPU calls return before the work is done
        if device.type == "cuda":
            torch.cuda.synchronize()

    contenders = {"MHA": (mha, "MHA", None), "GQA": (gqa, "GQA", None), "MLA absorbed": (mla, "MLA", "absorb"),
                  "MLA naive": (mla, "MLA", "naive")}

    def decode(name: str) -> tuple[float, torch.Tensor]:
        model, cache_name, mode = contenders[name]
        cache = caches[cache_name]
        if mode is not None:
            model.mode = mode
        cache.length = ctx
        logits = []
        sync()
        t = time.perf_counter()
        for i in range(args.steps):
            logits.append(model(steps[:, i:i + 1], cache=cache)[:, -1])
        sync()
        seconds = time.perf_counter() - t
        cache.length = ctx
        return seconds, torch.stack(logits, 1)

    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs = {}
    with torch.no_grad():
        for name in contenders:  # warm-up
            decode(name)
        for _ in range(args.rounds):
            for name in contenders:
                s, outputs[name] = decode(name)
                seconds[name].append(s)

    err = (outputs["MLA absorbed"] - outputs["MLA naive"]).abs().max().item()
    scale = outputs["MLA naive"].abs().max().item()
    assert torch.allclose(outputs["MLA absorbed"], outputs["MLA naive"], rtol=1e-4, atol=1e-4), err
    print(f"MLA absorbed vs naive logits: max |difference| {err:.1e} (logits up to {scale:.1f}): same")

    shape = dict(n_head=h, n_kv_head=n_kv, head_dim=dh, kv_lora_rank=4 * dh, qk_rope_head_dim=dh // 2)
    per_token = {kind: kv_cache_bytes(kind, n_layer=n_layer, dtype=torch.float32, **shape)
                 for kind in ("MHA", "GQA", "MLA")}
    for name in ("MHA", "GQA", "MLA"):
        assert caches[name].nbytes() == per_token[name] * b * total  # allocated bytes == Table 1's formula
    tok_s = {name: b * args.steps / statistics.median(s) for name, s in seconds.items()}
    print(f"\n{'contender':<14}{'tokens/s':>10}{'ms/step':>10}{'vs MHA':>9}{'cache at ' + str(ctx):>16}"
          f"{'per token':>12}")
    for name, (_, cache_name, _) in contenders.items():
        mib = per_token[cache_name] * b * ctx / 2**20
        print(f"{name:<14}{tok_s[name]:>10,.0f}{1000 * statistics.median(seconds[name]) / args.steps:>10.2f}"
              f"{tok_s[name] / tok_s['MHA']:>8.2f}x{mib:>12.1f} MiB{per_token[cache_name] / 1024:>8.2f} KiB")
    print(f"\ncache: MHA / MLA = {per_token['MHA'] / per_token['MLA']:.2f}x; "
          f"absorbed / naive MLA speed = {tok_s['MLA absorbed'] / tok_s['MLA naive']:.2f}x")
    print(f"gqa decode speedup vs mha: {tok_s['GQA'] / tok_s['MHA']:.2f}x ({n_kv} key-value heads for {h} query heads)")
    print(f"mla absorbed decode speedup vs mha: {tok_s['MLA absorbed'] / tok_s['MHA']:.2f}x")


if __name__ == "__main__":
    main()
