# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/04_v3.py (chapter 04).
# Edit the chapter, then run the export again.

"""DeepSeek-V3 in miniature (arXiv 2412.19437): a validated configuration with the reference names and the released
configurations of V3, V2, V2-Lite and DeepSeekMoE 16B, parameter and FLOP counting without allocating weights, and
`DeepSeekV3`: MLA in every layer, dense SwiGLU in the first layers and DeepSeekMoE after them, optional multi-token
prediction, and a reader and writer of Hugging Face transformers' DeepseekV3 and DeepseekV2 folders (chapter 04)."""

from __future__ import annotations

import json
import math
import warnings
from importlib import resources
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from dslib.mla import MLA, MLAConfig, MLACache, check_rope_scaling, scaled_rope_cos_sin
from dslib.moe import MoE, MoEConfig, MoETransformerConfig
from dslib.mtp import MTPModule, mtp_hidden
from dslib.transformer import (RMSNorm, SwiGLU, Transformer, TransformerConfig, document_causal_mask,
                               forward_inputs, hf_generation_config, read_safetensors, write_hf_folder)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# config.json fields that do not change the model dslib builds (bookkeeping, or values checked below).
_CONFIG_METADATA = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
                    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "attention_dropout", "pretraining_tp",
                    "num_key_value_heads", "head_dim", "qk_head_dim", "ep_size", "seq_aux", "output_router_logits",
                    "rope_scaling", "rope_parameters", "rope_interleave", "hidden_act", "attention_bias", "mlp_bias",
                    "moe_layer_freq", "_name_or_path", "num_experts", "router_aux_loss_coef"}
# What transformers' DeepseekV2Config assumes when a field is absent (it differs from V3-mini's defaults).
_V2_DEFAULTS = {"scoring_func": "softmax", "norm_topk_prob": False, "topk_method": "greedy", "bias_update_speed": 0.0}


def config_kwargs(d: dict, known: set[str]) -> dict:
    """The keyword arguments a config.json dict gives V3Config (the `known` field names). Features this
    implementation does not have are refused; fields it does not use (quantization_config, ...) are named in a
    warning; RoPE scaling (YaRN) is read from rope_scaling or rope_parameters (chapter 03's check_rope_scaling)."""
    if d.get("rope_interleave", True) is not True:
        raise ValueError("rope_interleave=False is not supported: dslib rotates interleaved pairs, as V3 does")
    for key, need in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("moe_layer_freq", 1)):
        if d.get(key, need) != need:
            raise ValueError(f"config field {key}={d[key]!r} is not supported: dslib's DeepSeekV3 needs {need!r}")
    if d.get("num_key_value_heads", d.get("num_attention_heads")) != d.get("num_attention_heads"):
        raise ValueError(f"num_key_value_heads={d['num_key_value_heads']} differs from num_attention_heads: MLA "
                         "gives every head its own key and value")
    if d.get("model_type") == "deepseek_v2":
        d = {**_V2_DEFAULTS, **d}
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or None
    kw = {k: v for k, v in d.items() if k in known and k != "rope_scaling"}
    kw["rope_scaling"] = check_rope_scaling(scaling)  # None for plain RoPE; a ValueError names a bad YaRN field
    if "rope_theta" not in kw and scaling and "rope_theta" in scaling:
        kw["rope_theta"] = scaling["rope_theta"]
    for key in ("n_group", "topk_group"):  # transformers writes None for "no groups"
        if kw.get(key, 1) is None:
            kw[key] = 1
    unused = sorted(k for k in d if k not in known and k not in _CONFIG_METADATA)
    if unused:
        warnings.warn(f"config fields that dslib does not use, ignored: {', '.join(unused)}", stacklevel=3)
    return kw


def _invalid(c, name: str, allowed: str) -> ValueError:
    return ValueError(f"V3Config.{name}={getattr(c, name)!r} is invalid: {allowed}")


def check_v3_config(c) -> None:
    """Validate a V3Config's fields (a ValueError naming the field), then build its MLA and MoE configurations, whose
    own checks catch shapes those modules refuse (an odd RoPE width, more experts per token than experts, ...)."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
        if not _positive_int(getattr(c, name)):
            raise _invalid(c, name, "a positive int is required")
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        value = getattr(c, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise _invalid(c, name, "an int >= 0 is required")
    if c.q_lora_rank is not None and not _positive_int(c.q_lora_rank):
        raise _invalid(c, "q_lora_rank", "None (no query compression) or a positive int is required")
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise _invalid(c, "first_k_dense_replace", f"at most num_hidden_layers={c.num_hidden_layers}")
    for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _invalid(c, name, "a positive number is required")
    for name in ("aux_loss_alpha", "bias_update_speed"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise _invalid(c, name, "a number >= 0 is required")
    c.mla_config()  # MLA's own checks (even RoPE width, latent ranks <= hidden size)
    if c.n_moe_layers or c.num_nextn_predict_layers:
        c.moe_config()  # the router's checks (top-k <= experts, groups divide the experts, ...)


RELEASED = {"DeepSeek-V3": "deepseek-v3.json", "DeepSeek-V2": "deepseek-v2.json",
            "DeepSeek-V2-Lite": "deepseek-v2-lite.json", "DeepSeekMoE-16B": "deepseek-moe-16b.json"}
_MOE_TRANSFORMER_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                          "num_key_value_heads": "n_kv_head", "max_position_embeddings": "max_seq_len",
                          "rms_norm_eps": "norm_eps", "initializer_range": "init_std"}


def released_config_dict(name: str) -> dict:
    """The released config.json of a DeepSeek model (a key of RELEASED), as a dict."""
    if name not in RELEASED:
        raise ValueError(f"unknown released model {name!r}: one of {sorted(RELEASED)} is required")
    return json.loads(resources.files("dslib").joinpath("configs", RELEASED[name]).read_text())


def released_config(name: str) -> "V3Config | MoETransformerConfig":
    """The configuration of a released model: a V3Config (V3, V2, V2-Lite) or, for DeepSeekMoE 16B (standard
    multi-head attention), chapter 02's MoETransformerConfig."""
    d = released_config_dict(name)
    if d["model_type"] in ("deepseek_v2", "deepseek_v3"):
        with warnings.catch_warnings():  # V3's FP8 quantization_config: a storage format, not the model
            warnings.simplefilter("ignore")
            return V3Config.from_dict(d)
    known = {f.name for f in fields(MoETransformerConfig)}
    kw = {_MOE_TRANSFORMER_NAMES.get(k, k): v for k, v in d.items()}
    return MoETransformerConfig(**{k: v for k, v in kw.items() if k in known})


@dataclass
class V3Config:
    """DeepSeek-V3's configuration, with the field names of its released config.json (as read by Hugging Face
    transformers), so a reader can hold it next to the official files; the table above says what each field means.
    The defaults are V3-mini, this chapter's model. Attention is MLA (dslib.mla) in every layer; the feed-forward
    layers are dense for the first `first_k_dense_replace`, DeepSeekMoE (dslib.moe) after."""

    vocab_size: int = 104
    hidden_size: int = 64
    intermediate_size: int = 192
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 1
    aux_loss_alpha: float = 0.0001
    bias_update_speed: float = 0.001
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.rope_scaling = check_rope_scaling(self.rope_scaling)  # chapter 03: None, or a checked YaRN block
        check_v3_config(self)  # defined in the cell above

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def max_seq_len(self) -> int:
        """dslib's name for the context length (the generation loop reads it)."""
        return self.max_position_embeddings

    def mla_config(self) -> MLAConfig:
        return MLAConfig(d_model=self.hidden_size, n_head=self.num_attention_heads, q_lora_rank=self.q_lora_rank or 0,
                         kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                         qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                         rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, norm_eps=self.rms_norm_eps)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(d_model=self.hidden_size, moe_intermediate_size=self.moe_intermediate_size,
                         n_routed_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                         n_shared_experts=self.n_shared_experts, scoring_func=self.scoring_func,
                         n_group=self.n_group, topk_group=self.topk_group, topk_method=self.topk_method,
                         norm_topk_prob=self.norm_topk_prob,
                         routed_scaling_factor=self.routed_scaling_factor, seq_aux_alpha=self.aux_loss_alpha,
                         init_std=self.initializer_range)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "V3Config":
        """Build from a dict such as a Hugging Face config.json (V2's or V3's): known fields are read, unused ones
        named in a warning, features this implementation does not have refused (config_kwargs, above)."""
        return cls(**config_kwargs(d, {f.name for f in fields(cls)}))

    # The released models, from their config.json files (released_config, above).
    @classmethod
    def deepseek_v3(cls) -> "V3Config":  # 671B total, 37B activated; one MTP module; YaRN
        return released_config("DeepSeek-V3")

    @classmethod
    def deepseek_v2(cls) -> "V3Config":  # 236B, 21B; softmax, no bias, group_limited_greedy; YaRN
        return released_config("DeepSeek-V2")

    @classmethod
    def deepseek_v2_lite(cls) -> "V3Config":  # 15.7B, 2.4B; no query compression, greedy routing; YaRN
        return released_config("DeepSeek-V2-Lite")


def _attention_params(c: V3Config) -> int:
    h, d = c.num_attention_heads, c.hidden_size
    if c.q_lora_rank:
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim  # W^DQ, its norm, W^UQ and W^QR
    else:
        q = d * h * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # W^DKV and W^KR, the latent's norm
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)  # W^UK and W^UV
    return q + kv + h * c.v_head_dim * d  # W^O


def _shapes(config) -> SimpleNamespace:
    """What counting needs from a V3Config (MLA) or a chapter 00 / chapter 02 decoder config (standard attention)."""
    if isinstance(config, V3Config):
        c = config
        return SimpleNamespace(d=c.hidden_size, vocab=c.vocab_size, attn=_attention_params(c), ffn=c.intermediate_size,
                               dense=c.first_k_dense_replace, moe=c.n_moe_layers, d_e=c.moe_intermediate_size,
                               shared=c.n_shared_experts, routed=c.n_routed_experts, k=c.num_experts_per_tok,
                               tied=c.tie_word_embeddings, mtp=c.num_nextn_predict_layers)
    if isinstance(config, TransformerConfig):
        c, is_moe = config, isinstance(config, MoETransformerConfig)
        attn = 2 * c.d_model * c.head_dim * (c.n_head + c.n_kv_head)  # W_Q and W_O; W_K and W_V for the KV heads
        dense = c.first_k_dense_replace if is_moe else c.n_layer
        return SimpleNamespace(d=c.d_model, vocab=c.vocab_size, attn=attn, ffn=c.intermediate_size, dense=dense,
                               moe=c.n_layer - dense, d_e=getattr(c, "moe_intermediate_size", 0),
                               shared=getattr(c, "n_shared_experts", 0), routed=getattr(c, "n_routed_experts", 0),
                               k=getattr(c, "num_experts_per_tok", 0), tied=False, mtp=0)
    raise TypeError(f"count_params needs a V3Config, MoETransformerConfig or TransformerConfig, not "
                    f"{type(config).__name__}")


def count_params(config, mtp: bool = False, active_embedding: bool = False) -> tuple[int, int]:
    """(total, activated) parameters of a model with this configuration, counted from the shapes without allocating
    anything: a V3Config (MLA), or chapter 02's MoETransformerConfig and chapter 00's TransformerConfig (standard
    attention, as in DeepSeekMoE 16B and DeepSeek LLM). Activated: what one token computes with (the attention, the
    dense FFNs, the shared experts, `num_experts_per_tok` routed experts and the router in every MoE layer, the norms
    and the output head). The input embedding is a table look-up: it counts among the activated parameters only with
    active_embedding=True (DeepSeekMoE's convention; V2 and V3 leave it out). MTP modules are left out unless mtp=True,
    as in V3's "671B total, 37B activated" (they add 14B to the released checkpoint's 685B, 11.5B of them unique)."""
    c = _shapes(config)
    d = c.d
    attn, norms = c.attn, 2 * d
    expert = 3 * d * c.d_e  # one SwiGLU expert: gate, up, down
    router = c.routed * d
    dense_layer = attn + norms + 3 * d * c.ffn
    moe_total = attn + norms + router + (c.shared + c.routed) * expert
    moe_active = attn + norms + router + (c.shared + c.k) * expert
    embed = c.vocab * d
    head = 0 if c.tied else c.vocab * d
    total = c.dense * dense_layer + c.moe * moe_total + embed + head + d
    active = c.dense * dense_layer + c.moe * moe_active + (head or embed) + d
    if active_embedding and head:
        active += embed
    if mtp and c.mtp:
        per_module = 3 * d + 2 * d * d  # enorm, hnorm, the head's norm, M_k
        total += c.mtp * (per_module + moe_total)
        active += c.mtp * (per_module + moe_active)
    return total, active


def flops_per_token(config: V3Config, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward, 3 x the forward's 2 FLOPs per multiply-add): 6 x the activated
    matrix parameters, plus attention's scores and weighted sums over a context of seq_len (DeepSeek LLM's M counts
    this term without the causal halving; so does this). The router and norms are included in the parameters."""
    _, active = count_params(config)
    c = config
    attention = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len * c.num_hidden_layers
    return 6 * active + 3 * attention


class V3Block(nn.Module):
    """A DeepSeek-V3 decoder layer: x + MLA(RMSNorm(x)), then + FFN(RMSNorm(x)), where the FFN is a SwiGLU in the
    first `first_k_dense_replace` layers and a DeepSeekMoE layer in the others."""

    def __init__(self, c: V3Config, layer: int, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = MLA(c.mla_config(), layer)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn = MoE(c.moe_config()) if moe else SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None, mode="naive"):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, mode)
        return x + self.ffn(self.ffn_norm(x))


def read_hf_config(directory: str | Path) -> dict:
    """A transformers DeepseekV3 or DeepseekV2 folder's config.json, as a dict (its model_type checked)."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: from_hf needs a checkpoint folder with config.json")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") not in ("deepseek_v3", "deepseek_v2", None):
        raise ValueError(f"{cfg_path}: model_type {raw.get('model_type')!r} is not deepseek_v3 or deepseek_v2")
    if raw.get("model_type") == "deepseek_v3" and raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"{cfg_path}: topk_method {raw['topk_method']!r}: transformers' DeepseekV3 routes noaux_tc")
    return raw


class CachesAndMTP:
    """DeepSeekV3's latent caches and its MTP methods (they use its config, embed, rope, lm_head and mtp modules)."""

    def _cache(self, n_layer: int, batch_size: int, max_len: int | None) -> MLACache:
        w, c = self.embed.weight, self.config
        shape = SimpleNamespace(n_layer=n_layer, kv_lora_rank=c.kv_lora_rank, qk_rope_head_dim=c.qk_rope_head_dim,
                                max_seq_len=c.max_position_embeddings)
        return MLACache(shape, batch_size, max_len, w.device, w.dtype)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> MLACache:
        """An empty latent cache (dslib.mla.MLACache) for the main layers."""
        return self._cache(self.config.num_hidden_layers, batch_size, max_len)

    def new_mtp_cache(self, batch_size: int, max_len: int | None = None) -> MLACache:
        """An empty latent cache for the MTP modules' blocks (used by speculative decoding)."""
        return self._cache(max(1, len(self.mtp)), batch_size, max_len)

    def mtp_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                   segments: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The MTP modules' predictions over a whole sequence: [logits^1 (b, t-1, vocab), ..., logits^D]; logits^k at
        position i predicts token t_{i+k+1}."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        mask = document_causal_mask(segments) if segments is not None else None
        cos, sin = self.rope(positions)
        hs = mtp_hidden(self.mtp, self.embed, input_ids, hidden, cos, sin, mask)
        return [self.lm_head(module.norm(h)) for module, h in zip(self.mtp, hs)]

    @torch.no_grad()
    def mtp_draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: MLACache) -> int:
        """Feed MTP module 1 the new positions (hidden states h_j with the tokens t_{j+1} after them), cached, and
        return its greedy guess for the token after the last of them (one sequence)."""
        n = next_ids.shape[1]
        positions = torch.arange(cache.length, cache.length + n, device=next_ids.device)[None]
        cos, sin = self.rope(positions)
        h = self.mtp[0](hidden, self.embed(next_ids), cos, sin, None, cache, mode=self.mode)
        cache.length += n
        return int(self.lm_head(self.mtp[0].norm(h[:, -1])).argmax(-1))


class HFCheckpoints:
    """DeepSeekV3's transformers folders, read and written (the mappings hf_to_dslib and dslib_to_hf are below)."""

    @classmethod
    def from_hf(cls, directory: str | Path, mode: str = "absorb") -> "DeepSeekV3":
        """Load a Hugging Face transformers DeepseekV3 checkpoint (config.json and *.safetensors, one tensor per
        expert, the layout the released weights use) into dslib, without transformers and without unpickling.
        Names are mapped one to one; per-expert matrices are stacked. MTP weights (layer num_hidden_layers onward,
        which transformers does not load either) are not read: the model comes without MTP."""
        raw = read_hf_config(directory)
        config = V3Config.from_dict({**raw, "num_nextn_predict_layers": 0})
        tensors, model = read_safetensors(directory), cls(config, mode=mode)
        v2 = raw.get("model_type") == "deepseek_v2"  # V2 has no selection bias: it stays zero
        load_checked(model, hf_to_dslib(tensors, config), directory, may_miss="e_score_correction_bias" if v2 else None)
        return model

    def to_hf(self, directory: str | Path, tokenizer=None) -> Path:
        """Write a transformers folder (config.json, model.safetensors in the released per-expert layout, and the
        tokenizer files when a dslib Tokenizer is given) that AutoModelForCausalLM loads: a DeepseekV3 folder for V3's
        routing (noaux_tc, sigmoid), a DeepseekV2 folder for V2's (group_limited_greedy or greedy, softmax). MTP
        modules are not written (transformers does not run them). Returns the folder."""
        c = self.config
        if tokenizer is not None and tokenizer.vocab_size != c.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                             f"{c.vocab_size}")
        return write_hf_folder(directory, hf_config_dict(c, tokenizer), dslib_to_hf(self.state_dict(), c),
                               hf_generation_config(c.max_position_embeddings, tokenizer), tokenizer,
                               model_max_length=c.max_position_embeddings)


class DeepSeekV3(CachesAndMTP, HFCheckpoints, nn.Module):
    """DeepSeek-V3 (arXiv 2412.19437, section 2): MLA in every layer, dense then DeepSeekMoE feed-forward layers, and
    D MTP modules (dslib.mtp) sharing the embedding and output head. forward has dslib.transformer.Transformer's
    signature, so training, packing and generation work unchanged; mode ("absorb"/"naive"): how a cached forward
    attends."""

    def __init__(self, config: V3Config, mode: str = "absorb"):
        super().__init__()
        c = self.config = config
        self.mode = mode
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(V3Block(c, i, moe=i >= c.first_k_dense_replace)
                                    for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        # MTP blocks are MoE layers, as in V3; module k (1-based) writes layer k - 1 of new_mtp_cache().
        self.mtp = nn.ModuleList(MTPModule(c.hidden_size, V3Block(c, k, moe=True), c.rms_norm_eps)
                                 for k in range(c.num_nextn_predict_layers))
        self.apply(self._init)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:  # normal(0, initializer_range) for every matrix
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)

    def num_params(self, embeddings: bool = True, mtp: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if mtp or not name.startswith("mtp."))
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE angles (cos, sin) of positions (b, t) for the decoupled keys and queries."""
        c = self.config
        return scaled_rope_cos_sin(positions, c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: MLACache | None = None, return_hidden: bool = False, logits_to_keep: int = 0):
        """input_ids (b, t) -> logits (b, t, vocab); with return_hidden, (logits, h) where h (b, t, d) is the last
        layer's output before the final norm: the h^0 that MTP module 1 reads.
        positions, segments, attn_mask, cache and logits_to_keep as in dslib.transformer.Transformer.forward (h is
        always every position's)."""
        positions, attn_mask = forward_inputs(input_ids, positions, segments, attn_mask, cache,
                                              self.config.max_position_embeddings)
        cos, sin = self.rope(positions)
        mode = self.mode if cache is not None else "naive"
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, mode)
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep > 0 else x))
        return (logits, x) if return_hidden else logits

    # Decoding is chapter 00's loop unchanged: it asks the model for a cache through new_cache.
    generate = Transformer.generate

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("naive", "absorb"):
            raise ValueError(f"mode={value!r} is invalid: 'naive' or 'absorb' is required")
        self._mode = value


_HF_ATTENTION = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
                 "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}


def hf_to_dslib(tensors: dict[str, torch.Tensor], config: V3Config) -> dict[str, torch.Tensor]:
    """Rename a transformers DeepseekV3ForCausalLM state dict to DeepSeekV3's names; stack per-expert weights
    (mlp.experts.{e}.gate_proj.weight, ...) into the MoE layer's (n_routed_experts, ...) tensors."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = w
        elif name == "model.norm.weight":
            out["norm.weight"] = w
        elif name == "lm_head.weight":
            out["lm_head.weight"] = w
        elif parts[:2] == ["model", "layers"]:
            i = int(parts[2])
            if i >= config.num_hidden_layers:
                continue  # an MTP layer: not loaded
            rest = parts[3:]
            p = f"layers.{i}."
            if rest[0] == "input_layernorm":
                out[p + "attn_norm.weight"] = w
            elif rest[0] == "post_attention_layernorm":
                out[p + "ffn_norm.weight"] = w
            elif rest[0] == "self_attn":
                out[p + "attn." + _HF_ATTENTION[rest[1]] + "." + rest[2]] = w
            elif rest[0] == "mlp" and rest[1] == "experts" and rest[2].isdigit():
                experts.setdefault((i, rest[3]), {})[int(rest[2])] = w
            elif rest[0] == "mlp" and rest[1] == "experts":  # transformers' fused layout (gate_up_proj, down_proj)
                if rest[2] == "gate_up_proj":
                    gate, up = w.chunk(2, dim=1)
                    out[p + "ffn.experts.gate_proj"], out[p + "ffn.experts.up_proj"] = gate, up
                else:
                    out[p + "ffn.experts." + rest[2]] = w
            elif rest[0] == "mlp":
                out[p + "ffn." + ".".join(rest[1:])] = w
            else:
                raise ValueError(f"unknown tensor {name} in a DeepseekV3 checkpoint")
        else:
            raise ValueError(f"unknown tensor {name} in a DeepseekV3 checkpoint")
    for (i, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(config.n_routed_experts)):
            raise ValueError(f"layer {i}: {proj} has experts {sorted(per_expert)[:5]}..., "
                             f"not 0..{config.n_routed_experts - 1}")
        out[f"layers.{i}.ffn.experts.{proj}"] = torch.stack([per_expert[e] for e in range(config.n_routed_experts)])
    return out


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], where, may_miss: str | None = None) -> None:
    """Load `state` into `model`, or raise a ValueError naming the first tensors that are missing, unexpected or of
    the wrong shape (names ending in `may_miss` may be absent)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (may_miss and k.endswith(may_miss))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: the checkpoint does not match its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {shapes[:5]}")
    model.load_state_dict(state, strict=False)


_DSLIB_ATTENTION = {ours: theirs for theirs, ours in _HF_ATTENTION.items()}


def hf_model_type(config: V3Config) -> str:
    """The transformers model type that computes what this configuration computes (or a ValueError naming why none)."""
    c = config
    if c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid":
        return "deepseek_v3"
    if c.topk_method in ("group_limited_greedy", "greedy") and c.scoring_func == "softmax":
        if c.norm_topk_prob:
            raise ValueError("V3Config.norm_topk_prob=True with V2's routing: transformers' DeepseekV2 never "
                             "normalises the gating weights, so no transformers model computes this one")
        return "deepseek_v2"
    raise ValueError(f"V3Config.topk_method={c.topk_method!r} with scoring_func={c.scoring_func!r}: transformers "
                     "has this routing in neither DeepseekV3 (noaux_tc, sigmoid) nor DeepseekV2 (softmax)")


def hf_config_dict(config: V3Config, tokenizer=None) -> dict:
    """The config.json of the transformers model that computes what `config` computes."""
    c, model_type = config, hf_model_type(config)
    d = {k: v for k, v in c.to_dict().items() if k not in ("bias_update_speed", "rope_scaling")}
    d.update(model_type=model_type, architectures=["DeepseekV3ForCausalLM" if model_type == "deepseek_v3"
                                                   else "DeepseekV2ForCausalLM"],
             num_key_value_heads=c.num_attention_heads, hidden_act="silu", attention_bias=False, torch_dtype="float32",
             num_nextn_predict_layers=0, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                                                           **(c.rope_scaling or {})})
    if tokenizer is not None:
        d.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return d


def dslib_to_hf(state: dict[str, torch.Tensor], config: V3Config) -> dict[str, torch.Tensor]:
    """DeepSeekV3's state dict under transformers' names, one matrix per expert (the inverse of hf_to_dslib). The
    MTP modules are left out; so is V2's selection bias, which must then be zero."""
    out: dict[str, torch.Tensor] = {}
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    v2 = hf_model_type(config) == "deepseek_v2"
    for name, w in state.items():
        parts = name.split(".")
        if name in top:
            out[top[name]] = w
        elif parts[0] == "mtp":
            continue
        elif parts[0] == "layers":
            p, rest = f"model.layers.{parts[1]}.", parts[2:]
            if rest[0] == "attn_norm":
                out[p + "input_layernorm.weight"] = w
            elif rest[0] == "ffn_norm":
                out[p + "post_attention_layernorm.weight"] = w
            elif rest[0] == "attn":
                out[p + "self_attn." + _DSLIB_ATTENTION[rest[1]] + "." + rest[2]] = w
            elif rest[:2] == ["ffn", "experts"]:
                for e in range(w.shape[0]):
                    out[f"{p}mlp.experts.{e}.{rest[2]}.weight"] = w[e]
            elif rest[:3] == ["ffn", "gate", "e_score_correction_bias"] and v2:
                if w.abs().max() > 0:
                    raise ValueError(f"{name} is not zero, and transformers' DeepseekV2 has no selection bias")
            else:
                out[p + "mlp." + ".".join(rest[1:])] = w
        else:
            raise ValueError(f"unknown tensor {name} in a DeepSeekV3 state dict")
    return out
