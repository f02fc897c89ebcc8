"""Unit tests of Transformer.to_hf / Transformer.from_hf and Tokenizer.to_hf: the dense model and the world's tokenizer
against Hugging Face transformers' LlamaForCausalLM and AutoTokenizer, code that no one here wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dslib.sampling import generate
from dslib.transformer import Transformer, TransformerConfig, permute_rope_rows, rope_halves_order
from dslib.world import World, prompt

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = World(n_docs=300)
TOK = WORLD.tokenizer
V = TOK.vocab_size
ATOL = 1e-4  # float32


def noisy_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight, norms included (they start at ones in both libraries, which would hide a swapped norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def dslib_model(n_kv_head: int | None, seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    c = dict(vocab_size=V, d_model=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, max_seq_len=96, init_std=0.2,
             rope_theta=500.0, norm_eps=1e-5)
    return noisy_(Transformer(TransformerConfig(**{**c, **kwargs})), seed)


def hf_model(n_kv_head: int, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=n_kv_head, max_position_embeddings=96, initializer_range=0.2,
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-5,
                    tie_word_embeddings=tie)
    return noisy_(LlamaForCausalLM(c), seed)


def ids(b: int = 3, t: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder written by to_hf from a small GQA model, with the world's tokenizer."""
    return dslib_model(2).to_hf(tmp_path / "llama", tokenizer=TOK)


# ---------------------------------------------------------------------------------------------------------------------
# The model, both directions


def test_rope_permutation_inverts_and_matches_halves():
    order = rope_halves_order(8)
    assert order.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    w = torch.randn(3 * 8, 5)
    there = permute_rope_rows(w, 3, to_llama=True)
    assert torch.equal(there[8:16], w[8:16][order])  # per head
    assert torch.equal(permute_rope_rows(there, 3, to_llama=False), w)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_to_hf_logits_equal_transformers(tmp_path: Path, n_kv_head: int):
    ours = dslib_model(n_kv_head)
    theirs = LlamaForCausalLM.from_pretrained(ours.to_hf(tmp_path / "m", tokenizer=TOK), dtype=torch.float32).eval()
    assert theirs.config.num_key_value_heads == n_kv_head and theirs.config.head_dim == 16
    x = ids()
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < ATOL, diff


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_from_hf_logits_equal_transformers(tmp_path: Path, n_kv_head: int):
    theirs = hf_model(n_kv_head)
    theirs.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_hf(tmp_path / "hf").eval()
    c = ours.config
    assert (c.n_kv_head, c.rope_theta, c.norm_eps, c.intermediate_size) == (n_kv_head, 500.0, 1e-5, 96)
    x = ids()
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < ATOL, diff


def test_from_hf_tied_embeddings_copy_the_embedding_into_the_head(tmp_path: Path):
    theirs = hf_model(2, tie=True)
    theirs.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_hf(tmp_path / "hf").eval()
    assert torch.equal(ours.lm_head.weight, ours.embed.weight)
    x = ids()
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() < ATOL


def test_round_trip_is_exact_and_folder_is_complete(folder: Path):
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0} and cfg["rope_theta"] == 500.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (TOK.bos_id, TOK.eos_id, TOK.pad_id)
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "float32"
    back = Transformer.from_hf(folder)
    assert back.config == dslib_model(2).config
    for (k, a), b in zip(dslib_model(2).state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_to_hf_replaces_an_earlier_export(tmp_path: Path):
    target = dslib_model(2, seed=0).to_hf(tmp_path / "m")
    dslib_model(2, seed=1).to_hf(target)
    assert torch.equal(Transformer.from_hf(target).embed.weight, dslib_model(2, seed=1).embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_interrupted_export_leaves_no_folder_and_keeps_the_old_one(tmp_path: Path):
    class Broken:
        vocab_size, bos_id, eos_id, pad_id, stoi = V, TOK.bos_id, TOK.eos_id, TOK.pad_id, TOK.stoi

        def to_hf(self, directory, model_max_length=None):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        dslib_model(2).to_hf(tmp_path / "new", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []
    old = dslib_model(2, seed=0).to_hf(tmp_path / "old")
    with pytest.raises(RuntimeError, match="disk full"):
        dslib_model(2, seed=1).to_hf(old, tokenizer=Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert torch.equal(Transformer.from_hf(old).embed.weight, dslib_model(2, seed=0).embed.weight)


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer


def test_autotokenizer_ids_equal_dslib_on_world_transcripts(folder: Path):
    hf = AutoTokenizer.from_pretrained(folder)
    docs = [d.text for d in WORLD.corpus()] + WORLD.prompts()[:50]
    assert len(docs) >= 300 and any(" wait " in d for d in docs) and any("<answer>" in d for d in docs)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (TOK.bos_id, TOK.eos_id, TOK.pad_id)
    for d in docs:
        with_bos = TOK.encode(d, bos=True)
        assert hf(d)["input_ids"] == with_bos, d
        assert hf(d, add_special_tokens=False)["input_ids"] == with_bos[1:], d
    assert TOK.id(" wait ") in hf(" wait ", add_special_tokens=False)["input_ids"]
    assert hf(" wait ", add_special_tokens=False)["input_ids"] == [TOK.id(" wait ")]


def test_autotokenizer_decodes_like_dslib(folder: Path):
    hf = AutoTokenizer.from_pretrained(folder)
    for d in [doc.text for doc in WORLD.corpus()[:100]]:
        full = TOK.encode(d, bos=True, eos=True) + [TOK.pad_id] * 3
        assert hf.decode(full, skip_special_tokens=True) == TOK.decode(full) == d  # pad, bos, eos dropped
        assert hf.decode(full) == TOK.decode(full, skip=())  # nothing dropped
    kept = TOK.encode("<think>1 wait 2</think> <answer> 3 </answer>")
    assert hf.decode(kept, skip_special_tokens=True) == "<think>1 wait 2</think> <answer> 3 </answer>"


def test_tokenizer_to_hf_alone(tmp_path: Path):
    out = TOK.to_hf(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(out)
    text = WORLD.corpus()[0].text
    assert hf(text)["input_ids"] == TOK.encode(text, bos=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        TOK.to_hf(tmp_path / "file")


def test_autotokenizer_refuses_characters_outside_the_vocabulary(folder: Path):
    hf = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(Exception, match="(?i)unk"):
        hf("7×6")
    with pytest.raises(ValueError, match="×"):
        TOK.encode("7×6")


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def test_transformers_greedy_generate_equals_dslib(folder: Path):
    ours = Transformer.from_hf(folder).eval()
    theirs = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf = AutoTokenizer.from_pretrained(folder)
    texts = [prompt(p) for p in WORLD.heldout]
    short = min(map(len, texts))
    texts = [t for t in texts if len(t) == short][:4] + [t for t in texts if len(t) > short][:4]
    assert len({len(t) for t in texts}) > 1  # prompts of different lengths: left padding matters
    stops = [TOK.eos_id, TOK.id("</answer>")]  # what generation_config.json says
    r = generate(ours, [TOK.encode(t, bos=True) for t in texts], 24, temperature=0.0, stop_ids=stops,
                 pad_id=TOK.pad_id)
    enc = hf(texts, padding=True, return_tensors="pt")  # left-padded, as generation needs
    out = theirs.generate(**enc, do_sample=False, max_new_tokens=24)  # stops and pad id from generation_config
    new = out[:, enc["input_ids"].shape[1]:]
    for i in range(len(texts)):
        mine = r.tokens[i][r.mask[i]].tolist()
        row = new[i].tolist()
        stop_at = next((j for j, t in enumerate(row) if t in stops), len(row) - 1)
        assert row[:stop_at + 1] == mine, texts[i]
    assert hf.batch_decode(new, skip_special_tokens=True) == r.texts(TOK)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each refused with an error that names what is wrong


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral"), "model_type='mistral'"),
    (dict(hidden_size=None), "'hidden_size' is missing"),
    (dict(num_hidden_layers=None), "'num_hidden_layers' is missing"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling="),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}), "rope_parameters="),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(num_key_value_heads=3), "n_kv_head=3"),
])
def test_from_hf_refuses_configs_it_cannot_represent(folder: Path, changes: dict, match: str):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=match):
        Transformer.from_hf(folder)


def rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_from_hf_names_a_tensor_of_the_wrong_shape(folder: Path):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(folder, lambda t: t.update({name: torch.zeros(64, 64)}))  # 4 KV heads' worth, config says 2
    with pytest.raises(ValueError, match=rf"{name}.*\(64, 64\).*\(32, 64\)"):
        Transformer.from_hf(folder)


def test_from_hf_names_a_missing_tensor(folder: Path):
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_tensors(folder, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"{name}.*missing"):
        Transformer.from_hf(folder)


def test_from_hf_names_an_unexpected_tensor(folder: Path):
    rewrite_tensors(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*not part"):
        Transformer.from_hf(folder)


def test_from_hf_needs_a_config_and_weights(tmp_path: Path, folder: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_hf(tmp_path / "nowhere")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Transformer.from_hf(folder)


def test_to_hf_refuses_a_file_and_a_folder_of_other_files(tmp_path: Path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        dslib_model(2).to_hf(tmp_path / "a_file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        dslib_model(2).to_hf(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="vocab_size"):
        dslib_model(2, vocab_size=V + 1).to_hf(tmp_path / "other", tokenizer=TOK)


def test_from_hf_on_a_subclass_with_other_layers_is_refused(folder: Path):
    class Other(Transformer):
        def __init__(self, config):
            super().__init__(config)

    with pytest.raises(TypeError, match="Other"):
        Other.from_hf(folder)
