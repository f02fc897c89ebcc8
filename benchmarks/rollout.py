"""Rollout speed of dslib.sampling's KV-cached engine against generation without a KV cache (chapter 05).

Contenders, in one process, on the same model and the same prompts, with the same seed:
- engine: dslib.sampling.generate (left-padded batch, one prefill, then one token per step from the KV cache);
- uncached: dslib.sampling.generate_uncached (the same sampling, but every step runs the whole sequence again).

The model is the course's base model's shape (width 96, 4 layers, 4 heads, context 96) with random weights, and no
stop token, so both generate exactly max_new_tokens per row; the prompts are GRPO's (the arithmetic world's, prompts of
different lengths, each repeated G times). Both must draw the same tokens. Rounds alternate between the contenders, and
the median round counts. Prints tokens per second and the ratio; the last line is the headline ratio.

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

    times = {"engine": [], "uncached": []}
    runs = {"engine": lambda: generate(model, prompts, args.new, seed=1, pad_id=tok.pad_id),
            "uncached": lambda: generate_uncached(model, prompts, args.new, seed=1, pad_id=tok.pad_id)}
    outs = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            outs[name] = run()
            times[name].append(time.perf_counter() - t0)
    a, b = outs["engine"], outs["uncached"]
    same = torch.equal(a.tokens, b.tokens) and torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
    agree = float((a.tokens == b.tokens).float().mean())
    print(f"same tokens and log-probabilities: {same} (token agreement {agree:.4f})")
    n_tokens = int(a.mask.sum())
    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
    for k in runs:
        print(f"{k:>9}: {tps[k]:>10,.0f} tokens/s  (median of {args.rounds} rounds, {statistics.median(times[k]):.2f} s)")
    print(f"rollout speedup vs uncached: {tps['engine'] / tps['uncached']:.2f}x")


if __name__ == "__main__":
    main()
