"""Speed of the MoE layer's dispatch (chapter 02).

Contenders, in one process, on the same weights and the same tokens (4096 tokens of width 256 by default), forward and
forward + backward:
- dslib MoE: dslib.moe.MoE, 64 routed experts of width 128, top 6, sigmoid gating (V3's), in its default dispatch
  (tokens sorted by expert, then dslib.moe.ExpertProducts on the CPU: torch.nn.functional.grouped_mm with gate and up
  fused, backward by hand) and with dispatch="loop" (one matrix product per expert, on autograd);
- dense: a SwiGLU of hidden width top-k x expert width (768), the same activated computation: the limit an MoE layer
  can at best reach;
- transformers: DeepseekV3MoE with the same weights, in its default experts implementation (grouped_mm) and in
  "eager", when transformers is installed ("batched_mm" gathers a copy of each chosen expert's weights per token, 6.4 GB
  at this shape, and is left out);
- for scale: the slow per-token reference, forward only, on 1/16 of the tokens and scaled up.

It also times the matrix products alone, with nothing around them, in the same rounds as the layers: the MoE layer's
six grouped products (gate and up fused, down, and the four of the backward pass, on the benchmark's own routing, as
dslib.moe calls them) against the dense layer's nine (three forward, six backward). Both do the same multiply-adds,
so their ratio is a floor for `moe time vs dense-equivalent` on this machine: what routing, gathering and scattering
cost comes on top of it. The lines after it give that rest, in the MoE and in the dense layer, and the spread of the
routing's load (what a padded batched product, one equal block per expert, would waste).

Every MoE contender must give the same output (checked first). Contenders are timed in alternating rounds, and the
median round counts. Prints times and ratios; the headline lines are `moe time vs dense-equivalent` (forward +
backward, the training step's cost) and, last, our default dispatch against the fastest transformers implementation,
the smaller of the forward and the forward + backward ratios.

    python benchmarks/moe_dispatch.py [--tokens 4096] [--rounds 5] [--threads N] [--system-allocator]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dslib
from dslib.moe import MoE, MoEConfig
from dslib.transformer import SwiGLU


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The routed experts one token and one chosen expert at a time (no shared experts in this benchmark)."""
    r = moe.gate(x)
    ex = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(r.indices[t].tolist(), r.weights[t].tolist()):
            out[t] += w * ex.expert(e, x[t])
    return out


def products(moe: MoE, dense: SwiGLU, x: torch.Tensor,
             counts: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """The MoE layer's grouped matrix products alone and the dense layer's, forward and backward, as two calls
    (random operands of the right shapes; the MoE's blocks are `counts`, the tokens its router gives each expert)."""
    from dslib.moe import _per_expert, _weight_grads

    ex = moe.experts
    offs = counts.cumsum(0).to(torch.int32)
    pairs, d, i = int(counts.sum()), x.shape[1], ex.down_proj.shape[2]
    w_gu, down = torch.cat([ex.gate_proj, ex.up_proj], dim=1).detach(), ex.down_proj.detach()
    xs, hw, g_out, g_gu = (torch.randn(pairs, w, device=x.device) for w in (d, i, d, 2 * i))
    n, hidden = x.shape[0], dense.gate_proj.weight.shape[0]
    w1, w3, w2 = (lin.weight.detach() for lin in (dense.gate_proj, dense.up_proj, dense.down_proj))
    h, g_y, g_h = (torch.randn(n, w, device=x.device) for w in (hidden, d, hidden))

    def moe_products():  # as ExpertProducts.forward and .backward call them
        _per_expert(xs, w_gu, offs), _per_expert(hw, down, offs)
        _weight_grads(g_out, hw, offs), _per_expert(g_out, down.transpose(1, 2), offs)
        _weight_grads(g_gu, xs, offs), _per_expert(g_gu, w_gu.transpose(1, 2), offs)

    def dense_products():  # three nn.Linear: forward, then each one's input and weight gradients
        F.linear(x, w1), F.linear(x, w3), F.linear(h, w2)
        g_y @ w2, g_y.t() @ h, g_h @ w1, g_h.t() @ x, g_h @ w3, g_h.t() @ x

    return moe_products, dense_products


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--expert-width", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--system-allocator", action="store_true",
                   help="leave the C library's allocator as it is (dslib.setup's keep_memory=False)")
    args = p.parse_args()
    device = dslib.setup(seed=0, threads=args.threads, quiet=True, keep_memory=not args.system_allocator)
    n, d, e, k, i = args.tokens, args.d_model, args.experts, args.top_k, args.expert_width
    kept = "freed memory kept for reuse" if dslib.freed_memory_kept() else "system allocator"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {kept}; {n} tokens, "
          f"width {d}, {e} experts of width {i}, top {k}")

    cfg = MoEConfig(d_model=d, moe_intermediate_size=i, n_routed_experts=e, num_experts_per_tok=k,
                    n_shared_experts=0, scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    moe = MoE(cfg).to(device)
    moe.gate.e_score_correction_bias.normal_(0, 0.01)
    dense = SwiGLU(d, k * i).to(device)
    torch.nn.init.normal_(dense.gate_proj.weight, std=0.02)
    x = torch.randn(n, d, device=device)

    layers: dict[str, tuple[torch.nn.Module, str | None]] = {"dslib MoE": (moe, "auto"), "dslib MoE loop": (moe, "loop")}
    layers["dense (same activated)"] = (dense, None)
    hf_names = []
    if importlib.util.find_spec("transformers") is not None:
        import transformers
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        hf_cfg = DeepseekV3Config(hidden_size=d, moe_intermediate_size=i, n_routed_experts=e, num_experts_per_tok=k,
                                  n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                  routed_scaling_factor=2.5)
        hf = DeepseekV3MoE(hf_cfg).to(device)
        hf.load_state_dict({"gate.weight": moe.gate.weight, "gate.e_score_correction_bias":
                            moe.gate.e_score_correction_bias,
                            "experts.gate_up_proj": torch.cat([moe.experts.gate_proj, moe.experts.up_proj], dim=1),
                            "experts.down_proj": moe.experts.down_proj}, strict=False)

        class NoShared(torch.nn.Module):  # this benchmark has no shared expert; DeepseekV3MoE always builds one
            def forward(self, h):
                return torch.zeros_like(h)

        hf.shared_experts = NoShared()
        default = hf.config._experts_implementation or "grouped_mm"  # what from_pretrained picks when it can
        # "batched_mm" is left out: it copies each chosen expert's weights for every token (6.4 GB at this shape).
        for impl in dict.fromkeys([default, "eager", "grouped_mm"]):
            name = f"transformers {impl}" + (" (default)" if impl == default else "")
            layers[name] = (hf, impl)
            hf_names.append(name)
        print(f"transformers {transformers.__version__}")

    def run(name: str, backward: bool) -> torch.Tensor:
        layer, mode = layers[name]
        if layer is moe:
            moe.experts.dispatch = mode
        elif layer is not dense:
            layer.config._experts_implementation = mode
        if not backward:
            with torch.no_grad():
                return layer(x)
        xg = x.detach().requires_grad_(True)
        y = layer(xg)
        (y * y).mean().backward()
        return y.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    reference = run("dslib MoE", False)
    for name in layers:
        if name.startswith("dense"):
            continue
        err = (run(name, False) - reference).abs().max().item()
        print(f"{name:<32} max |output - dslib MoE| = {err:.1e}")
        assert err < 1e-4, (name, err)
    sub = max(1, n // 16)
    with torch.no_grad():
        t = time.perf_counter()
        slow = per_token_reference(moe, x[:sub])
        slow_seconds = (time.perf_counter() - t) * n / sub
    assert (slow - reference[:sub]).abs().max().item() < 1e-5
    print(f"per-token reference on {sub} tokens: same output; {slow_seconds:.1f} s for {n} tokens (scaled)")

    phases = ("forward", "forward+backward")
    seconds = {(name, ph): [] for name in layers for ph in phases}
    with torch.no_grad():
        load = torch.bincount(moe.gate(x).indices.flatten(), minlength=e)  # tokens per expert
    moe_products, dense_products = products(moe, dense, x, load)
    alone = {"MoE products": moe_products, "dense products": dense_products}  # timed in the same rounds
    seconds.update({(name, "products"): [] for name in alone})
    for name in layers:  # warm-up
        for ph in phases:
            run(name, ph != "forward")
    for fn in alone.values():
        fn()
    for _ in range(args.rounds):
        for name in layers:
            for ph in phases:
                for prm in list(moe.parameters()) + list(dense.parameters()):
                    prm.grad = None
                sync()
                t = time.perf_counter()
                run(name, ph != "forward")
                sync()
                seconds[(name, ph)].append(time.perf_counter() - t)
        for name, fn in alone.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            seconds[(name, "products")].append(time.perf_counter() - t)
    med = {key: statistics.median(v) for key, v in seconds.items()}
    print(f"\n{'contender':<32}{'forward ms':>12}{'fwd+bwd ms':>12}{'fwd / dense':>13}{'f+b / dense':>13}")
    dense_name = "dense (same activated)"
    for name in layers:
        print(f"{name:<32}{1000 * med[(name, 'forward')]:>12.1f}{1000 * med[(name, 'forward+backward')]:>12.1f}"
              f"{med[(name, 'forward')] / med[(dense_name, 'forward')]:>12.2f}x"
              f"{med[(name, 'forward+backward')] / med[(dense_name, 'forward+backward')]:>12.2f}x")
    print(f"{'per-token reference':<32}{1000 * slow_seconds:>12.1f}{'':>12}"
          f"{slow_seconds / med[(dense_name, 'forward')]:>12.1f}x")
    print("\ndslib MoE against the dense layer's time: "
          + ", ".join(f"{ph} {med[('dslib MoE', ph)] / med[(dense_name, ph)]:.2f}x" for ph in phases))
    floor_moe, floor_dense = med[("MoE products", "products")], med[("dense products", "products")]
    print(f"the matrix products alone (same multiply-adds): MoE's grouped {1000 * floor_moe:.1f} ms, dense "
          f"{1000 * floor_dense:.1f} ms; expert products vs dense products: {floor_moe / floor_dense:.2f}x, the floor "
          f"of the ratio below on this machine")
    moe_fb, dense_fb = med[("dslib MoE", "forward+backward")], med[(dense_name, "forward+backward")]
    print(f"the rest of each layer (routing, sorting, gathering, scattering, activations and their backward): MoE "
          f"{1000 * (moe_fb - floor_moe):.1f} ms, dense {1000 * (dense_fb - floor_dense):.1f} ms; with these products, "
          f"1.30x the dense layer leaves the MoE's rest {1000 * (1.3 * dense_fb - floor_moe):.1f} ms")
    print(f"tokens per expert on this routing: {load.min().item()}-{load.max().item()} (mean {n * k / e:.0f}); a "
          f"padded batched product (every expert padded to the busiest) would multiply "
          f"{e * load.max().item() / (n * k):.2f}x the pairs")
    print(f"moe time vs dense-equivalent: {moe_fb / dense_fb:.2f}x")
    if hf_names:
        speedups = []
        for ph in phases:
            fastest = min(hf_names, key=lambda nm: med[(nm, ph)])
            s = med[(fastest, ph)] / med[("dslib MoE", ph)]
            speedups.append(s)
            print(f"{ph}: fastest transformers implementation is {fastest}; dslib MoE is {s:.2f}x its speed")
        print(f"moe speedup vs transformers (fastest): {min(speedups):.2f}x")
    else:
        print("transformers is not installed: no peer to compare with")


if __name__ == "__main__":
    main()
