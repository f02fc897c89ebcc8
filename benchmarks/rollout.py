"""Rollout speed of dslib.sampling's KV-cached engine against generation without a KV cache (chapter 05).

Contenders, in one process, on the same model and the same prompts, with the same seed:
- engine: dslib.sampling.generate (left-padded batch, one prefill, then one token per step from the KV cache; rows
  that have finished leave the batch and the cache);
- engine, keep rows: the same with drop_finished=False (every row runs to the longest completion);
- uncached: dslib.sampling.generate_uncached (the same sampling, but every step runs the whole sequence again).

Two workloads. "fixed length": the course's base model's shape (width 96, 4 layers, 4 heads, context 96) with random
weights and no stop token, so every row generates exactly max_new_tokens. "GRPO": the cached base model itself
(dslib.pretrained.base_model, built if missing) with the world's </answer> stop token, so completions have the lengths
GRPO sees (short bare answers beside long reflective ones). The prompts are GRPO's (the arithmetic world's, prompts of
different lengths, each repeated G times). All contenders must draw the same tokens. Rounds alternate between the
contenders, and the median round counts. Prints tokens per second and ratios; the last line is the headline ratio, on
the GRPO workload.

    python benchmarks/rollout.py [--prompts 32] [--group 8] [--new 64] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dslib
from dslib.sampling import generate, generate_uncached
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import World, prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new", type=int, default=64, help="new tokens per completion")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    device = dslib.setup(seed=0, threads=args.threads, quiet=True)
    world = World(n_docs=10)
    tok = world.tokenizer
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tok.vocab_size, d_model=96, n_layer=4, n_head=4,
                                          max_seq_len=96)).to(device).eval()
    import random

    rng = random.Random(0)
    problems = [world.sample_problem(rng) for _ in range(args.prompts)]
    prompts = [tok.encode(prompt(q), bos=True) for q in problems for _ in range(args.group)]
    lengths = sorted({len(x) for x in prompts})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; {len(prompts)} rollouts "
          f"({args.prompts} prompts x G={args.group}) of {args.new} new tokens, prompt lengths {lengths[0]}-"
          f"{lengths[-1]}, {model.num_params():,} parameters")

    from dslib.pretrained import base_model

    stop = [tok.id("</answer>")]
    workloads = {"fixed length": (model, []), "GRPO": (base_model(0, device=device).eval(), stop)}
    speedup = 0.0
    for label, (net, stop_ids) in workloads.items():
        runs = {"engine": lambda: generate(net, prompts, args.new, seed=1, pad_id=tok.pad_id, stop_ids=stop_ids),
                "engine, keep rows": lambda: generate(net, prompts, args.new, seed=1, pad_id=tok.pad_id,
                                                      stop_ids=stop_ids, drop_finished=False),
                "uncached": lambda: generate_uncached(net, prompts, args.new, seed=1, pad_id=tok.pad_id,
                                                      stop_ids=stop_ids)}
        times = {k: [] for k in runs}
        outs = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                outs[name] = run()
                times[name].append(time.perf_counter() - t0)
        a = outs["engine"]
        n_tokens = int(a.mask.sum())
        print(f"\n{label} workload: {n_tokens:,} completion tokens (mean length {a.lengths.float().mean():.1f})")
        for other in ("engine, keep rows", "uncached"):
            b = outs[other]
            same = (torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
                    and torch.allclose(a.logprobs, b.logprobs, atol=1e-4))
            agree = float((a.tokens == b.tokens).float().mean())
            print(f"  engine vs {other}: same tokens and log-probabilities: {same} (token agreement {agree:.4f})")
        tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
        for k in runs:
            print(f"  {k:>17}: {tps[k]:>10,.0f} tokens/s  (median of {args.rounds} rounds, "
                  f"{statistics.median(times[k]):.2f} s)")
        print(f"  dropping finished rows: {tps['engine'] / tps['engine, keep rows']:.2f}x")
        speedup = tps["engine"] / tps["uncached"]
        print(f"  {label}: rollout speedup vs uncached: {speedup:.2f}x; engine {tps['engine']:,.0f} tokens/s")
    print(f"rollout speedup vs uncached: {speedup:.2f}x")


if __name__ == "__main__":
    main()
