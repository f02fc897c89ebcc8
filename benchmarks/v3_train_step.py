"""Training-step throughput of dslib's DeepSeek-V3-mini against transformers' DeepseekV3ForCausalLM (chapter 04).

Both models get the same configuration and the same weights (the transformers model is built, saved, and loaded into
dslib with DeepSeekV3.from_hf), and are first checked to give the same logits. Then each trains on the same random
batches with AdamW: forward, cross-entropy, backward, optimizer step. Contenders alternate in rounds and the median
round counts. transformers runs in its default experts implementation and in each other one it offers; the fastest is
the peer. Prints tokens per second and ratios; the last line is the headline ratio.

For planning the capstone's budget it also times, on the arithmetic world's packed corpus, the training steps the course
runs: the dense base model (dslib.pretrained.BASE_RECIPE: width 96, 4 layers, 20 rows of 96 tokens, next-token loss)
and DeepSeek-V3-mini (chapter 04's V3Config at the world's vocabulary, one MTP module, V3's loss with lambda 0.3), on
the same batches; printed as `tokens/s ...` lines before the headline.

With --compile it also times dslib's step with the forward and loss under torch.compile (default backend), and prints
how long the compilation took; it never enters the headline, which compares eager with eager.

    python benchmarks/v3_train_step.py [--batch 8] [--seq 128] [--hidden 128] [--layers 4] [--experts 16] [--topk 4]
                                       [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import dslib
from dslib.mtp import mtp_loss
from dslib.pretrained import BASE_RECIPE, base_world
from dslib.train import batch_loss
from dslib.transformer import Transformer
from dslib.v3 import DeepSeekV3, V3Config
from dslib.world import PackedData


def course_models_rate(device: torch.device, rounds: int, steps: int) -> dict[str, float]:
    """Training-step tokens/s of the course's dense base model and of V3-mini on the world's packed corpus."""
    recipe = BASE_RECIPE
    world = base_world(recipe)
    vocab = world.tokenizer.vocab_size
    data = PackedData([d.text for d in world.corpus()[:20000]], world.tokenizer, recipe.seq_len, recipe.batch_size,
                      seed=0)
    torch.manual_seed(0)
    dense = Transformer(recipe.model_config(vocab)).to(device)
    v3 = DeepSeekV3(V3Config(vocab_size=vocab, num_nextn_predict_layers=1,
                             max_position_embeddings=recipe.seq_len)).to(device)
    models = {f"dense base ({dense.num_params():,} parameters)": (dense, lambda m, b: batch_loss(m, b)),
              f"V3-mini ({v3.num_params(mtp=True):,} parameters, MTP)": (v3, lambda m, b: mtp_loss(m, b, 0.3)[0])}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, (m, _) in models.items()}
    times = {name: [] for name in models}
    step = 0
    for r in range(rounds + 1):  # the first round warms up
        for name, (m, loss_fn) in models.items():
            m.train()
            batches = [data.batch(step + i, device) for i in range(steps)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in batches:
                loss = loss_fn(m, b)
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t0)
        step += steps
    tokens = steps * recipe.batch_size * recipe.seq_len
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="also time dslib's step with torch.compile (the compilation takes about a minute on 2 cores)")
    args = p.parse_args()
    device = dslib.setup(seed=0, threads=args.threads)
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        raise SystemExit("transformers is not installed: pip install -e '.[dev]'")

    d = args.hidden
    hf_config = DeepseekV3Config(
        vocab_size=args.vocab, hidden_size=d, intermediate_size=3 * d, moe_intermediate_size=d // 2,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=d // 2,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(hf_config)
    with torch.no_grad():  # transformers starts the router at zero, which would route every token alike
        for name, prm in reference.named_parameters():
            if "mlp.gate.weight" in name:
                prm.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = DeepSeekV3.from_hf(folder)
    reference, ours = reference.to(device), ours.to(device)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    with torch.no_grad():
        err = (reference.eval()(x).logits - ours.eval()(x)).abs().max().item()
    print(f"same weights, max |logit difference| {err:.1e}")
    if err > 1e-3:
        raise SystemExit("the two models disagree: not comparing their speed")

    hf_default = getattr(reference.config, "_experts_implementation", None) or "eager"
    impls = [hf_default, "eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # transformers >= 5
        impls += list(ALL_EXPERTS_FUNCTIONS.keys())
    except ImportError:
        pass
    impls = list(dict.fromkeys(impls))  # the default first, no repeats

    def hf_step(impl):
        reference.config._experts_implementation = impl
        logits = reference(x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())

    def ours_loss():
        return F.cross_entropy(ours(x).flatten(0, 1).float(), x.flatten())

    contenders = {"dslib": (ours, ours_loss)}
    if args.compile:
        # a fresh compile cache, so the time printed is what a first run pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="v3-train-step-inductor-")
        compiled_loss = torch.compile(ours_loss)
        ours.train()
        t0 = time.perf_counter()
        compiled_loss().backward()  # compiles the forward and the backward
        ours.zero_grad(set_to_none=True)
        print(f"torch.compile of dslib's forward and loss (empty compile cache): {time.perf_counter() - t0:.1f} s "
              f"for the first step")
        contenders["dslib (torch.compile)"] = (ours, compiled_loss)
    for impl in impls:
        label = f"transformers ({impl}{', default' if impl == hf_default else ''})"
        contenders[label] = (reference, lambda impl=impl: hf_step(impl))
    # one optimizer per contender, so each keeps its own moments even where two share a model
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in contenders.items()}
    usable = {}
    for name, (m, loss_fn) in contenders.items():
        m.train()
        try:
            loss = loss_fn()
            loss.backward()
            optimizers[name].zero_grad(set_to_none=True)
            usable[name] = (m, loss_fn)
        except Exception as e:  # an experts implementation this machine lacks (for example a GPU-only kernel)
            print(f"{name}: unavailable here ({type(e).__name__}: {str(e)[:80]})")
    times = {name: [] for name in usable}
    for _ in range(args.rounds):
        for name, (m, loss_fn) in usable.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = loss_fn()
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    tokens = args.steps * args.batch * args.seq
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"{device.type.upper()}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens, "
          f"{args.layers} layers, {args.experts} experts (top-{args.topk}), hidden {d}")
    for name, r in rate.items():
        print(f"{name:<40}{r:>12,.0f} tokens/s")
    course = course_models_rate(device, args.rounds, args.steps)
    for name, r in course.items():
        print(f"tokens/s of the course's {name}, training on the world corpus: {r:,.0f}")
    peers = {k: v for k, v in rate.items() if k.startswith("transformers")}
    fastest = max(peers, key=peers.get)
    default = next(iter(peers))
    print(f"speedup vs {default}: {rate['dslib'] / peers[default]:.2f}x")
    if "dslib (torch.compile)" in rate:
        print(f"dslib compiled vs eager: {rate['dslib (torch.compile)'] / rate['dslib']:.2f}x (compilation not counted)")
    print(f"v3 train step speedup vs transformers: {rate['dslib'] / peers[fastest]:.2f}x")


if __name__ == "__main__":
    main()
