"""Unit tests of dslib.r1 (chapter 07): the language measures and the consistency reward (handmade and fuzzed), the
readability checks, the rejection filter, and the four stages on a tiny model (each checkpoints and, run again,
loads instead of training); plus the bilingual world of chapter 00 and the cached R1 study of dslib.pretrained."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dslib.r1 import (R1Config, SKIPPABLE, bilingual, brevity_reward, cold_start, cold_start_data, keep_sample,
                      language_consistency_reward, language_marks, language_share, measure_r1, mixes, r1_rewards,
                      readability, readable, reasoning_language, reasoning_rl, rejection_sample, rejection_sft,
                      run_r1)
from dslib.r1zero import sample_k
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import Problem, World, WorldConfig, prompt

SYM = Problem((7, 35, 12), ("+", "-"))
EN = SYM.in_language("en")
ANSWER = "</think> <answer> 30 </answer>"


def test_problem_in_words():
    assert SYM.text == "07+35-12" and EN.text == "07 plus 35 minus 12"
    assert prompt(EN) == "Q:07 plus 35 minus 12 <think>" and EN.answer == SYM.answer == 30
    assert EN.in_language("sym") == SYM
    with pytest.raises(ValueError, match="language"):
        Problem((1, 2), ("+",), 2, "fr")


def test_default_world_is_unchanged_and_bilingual_world_is_consistent():
    assert all(p.language == "sym" for p in World(n_docs=200).heldout)
    docs = World(n_docs=2000).corpus()
    assert all(d.problem.language == "sym" for d in docs)
    w = World(n_docs=4000, prompt_en_rate=0.5, en_rate=0.0, switch_rate=0.0, en_prompt_consistency=1.0)
    worked = [d for d in w.corpus() if d.style != "bare"]
    assert {d.problem.language for d in worked} == {"sym", "en"}
    assert all(d.language == d.problem.language for d in worked)  # full consistency: reasoning in the prompt's
    held = {(p.operands, p.ops) for p in w.heldout}
    assert not any((d.problem.operands, d.problem.ops) in held for d in w.corpus())  # in either language
    with pytest.raises(ValueError, match="prompt_en_rate"):
        WorldConfig(prompt_en_rate=1.5)


def test_language_measures_on_handmade_strings():
    words = "07 plus 35 is 42 42 minus 12 is 30" + ANSWER
    syms = "07+35=42 42-12=30" + ANSWER
    mixed = "07 plus 35 is 42 42-12=30" + ANSWER
    assert language_marks(words) == {"sym": 0, "en": 4} and language_marks(syms) == {"sym": 4, "en": 0}
    assert language_share(mixed, "en") == 0.5 and reasoning_language(mixed) == "mixed" and mixes(mixed)
    assert language_consistency_reward(words, EN) == 1.0 and language_consistency_reward(words, SYM) == 0.0
    assert language_consistency_reward(mixed, EN) == 0.5
    assert language_consistency_reward(ANSWER, EN) == 1.0 and language_share(ANSWER, "en") is None  # bare answer
    assert language_marks("07+35=42</think> plus minus is") == {"sym": 2, "en": 0}  # only the reasoning counts
    assert language_marks("thesis island") == {"sym": 0, "en": 0}  # "is" inside a word is not the word
    assert not mixes(words) and reasoning_language(ANSWER) == "none"
    with pytest.raises(ValueError, match="language"):
        language_share(words, "fr")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(st.sampled_from(list("0123456789+-= plusminusiwait<>/") + ["</think>", " wait ", " plus ",
                                                                                      " is ", "<answer>"]),
                          max_size=40).map("".join),
                 st.text(max_size=40), st.none(), st.integers(), st.binary(max_size=8)),
       st.sampled_from(["sym", "en"]))
def test_language_reward_and_mixing_never_raise_and_stay_in_range(text, lang):
    p = SYM.in_language(lang)
    r = language_consistency_reward(text, p)
    assert 0.0 <= r <= 1.0
    assert isinstance(mixes(text), bool)
    share = language_share(text, lang)
    assert share is None or 0.0 <= share <= 1.0
    checks = readability(text)
    assert set(checks) == {"format", "one_language", "parses", "no_repeats"}
    assert 0.0 <= brevity_reward(text, p) <= 1.0
    assert readable(text) == all(checks.values())
    if mixes(text):
        assert 0.0 < r < 1.0 and not readable(text)


def test_readability_checks():
    assert readable("42 wait 07+35=42 42-12=30" + ANSWER)
    assert readable("07 plus 35 is 42 42 minus 12 is 30" + ANSWER) and readable(ANSWER)
    assert readability("07+35=42 wait 07+35=42 42-12=30" + ANSWER)["no_repeats"] is False
    assert readability("07+35=42 42-1" + ANSWER)["parses"] is False
    assert readability("07+35=42 42-12=30" + ANSWER + " 30")["format"] is False
    assert readability("07+35=42 42 minus 12 is 30" + ANSWER)["one_language"] is False
    assert not any(readability(None).values())


def test_brevity_reward_only_pays_right_easy_answers():
    easy = Problem((7, 35), ("+",))
    assert brevity_reward("</think> <answer> 42 </answer>", easy) == 1.0
    assert brevity_reward("</think> <answer> 41 </answer>", easy) == 0.0
    assert 0 < brevity_reward("07+35=42</think> <answer> 42 </answer>", easy) < 1
    assert brevity_reward(ANSWER, SYM) == 0.0  # longer problems: no preference
    parts = r1_rewards(0.2, 0.3).parts
    assert set(parts) == {"accuracy", "format", "language", "brevity"} and parts["language"][1] == 0.2
    assert set(r1_rewards(0.0).parts) == {"accuracy", "format"}  # R1-Zero's rules


def test_rejection_filter_keeps_only_right_single_language_samples():
    right_words = "07 plus 35 is 42 42 minus 12 is 30" + ANSWER
    assert keep_sample(right_words, EN)
    assert not keep_sample(right_words, SYM)  # right, readable, but in the other language
    assert not keep_sample("07 plus 35 is 42 42-12=30" + ANSWER, EN)  # mixed
    assert not keep_sample("07 plus 35 is 42 42 minus 12 is 31</think> <answer> 31 </answer>", EN)  # wrong
    assert not keep_sample("07 plus 35 is 42 wait 07 plus 35 is 42 42 minus 12 is 30" + ANSWER, EN)  # repeats
    assert keep_sample(ANSWER, EN) and not keep_sample("</think> <answer> 31 </answer>", EN)


def test_cold_start_data_is_readable_single_language_and_right():
    w = World(n_docs=100, prompt_en_rate=0.5)
    texts = cold_start_data(w, 60, seed=1)
    assert len(texts) == 60 and texts == cold_start_data(w, 60, seed=1)
    langs = set()
    for t in texts:
        q, completion = t.split(" <think>", 1)
        lang = "en" if " plus " in q or " minus " in q else "sym"
        langs.add(lang)
        assert readable(completion) and reasoning_language(completion) == lang and " wait " in completion
    assert langs == {"sym", "en"}


# --- the stages on a tiny model ---------------------------------------------------------------------------------

TINY = R1Config(cold_start_examples=8, cold_start_steps=2, sft_batch=2, seq_len=128,
                rl={"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8}, rejection_problems=4,
                rejection_k=2, non_reasoning=8, sft_steps=2, final_rl={"steps": 1})


@pytest.fixture
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = World(n_docs=200, prompt_en_rate=0.5)
    model = Transformer(TransformerConfig(vocab_size=w.tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2,
                                          max_seq_len=128)).eval()
    yield model, w
    torch.set_num_threads(threads)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_each_stage_runs_checkpoints_and_loads_again(tiny, tmp_path):
    model, w = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_r1(model, w, TINY, tmp_path, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is never modified
    assert set(out["models"]) == {"cold_start", "reasoning_rl", "rejection_sft", "all_scenarios_rl"}
    f = out["folders"]
    assert f["all_scenarios_rl"] == tmp_path / "cold_start" / "reasoning_rl" / "rejection_sft" / "all_scenarios_rl"
    assert (f["cold_start"] / "model.safetensors").exists() and (f["rejection_sft"] / "rejection.json").exists()
    assert [s for s, _ in out["trainers"]["reasoning_rl"].checkpoints()] == [0, 2]
    assert out["rejection"]["problems"] == 4 and out["rejection"]["non_reasoning"] == 8
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    again = run_r1(model, w, TINY, tmp_path, progress=False)  # finished stages load: nothing is written
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == stamp
    for stage in out["models"]:
        assert same(out["models"][stage], again["models"][stage]), stage
    fresh = run_r1(model, w, TINY, None, progress=False)  # deterministic without any folder too
    assert same(fresh["final"], out["final"])


def test_an_interrupted_stage_resumes(tiny, tmp_path):
    model, w = tiny
    full = reasoning_rl(model, w, TINY, tmp_path / "a", progress=False)
    half = R1Config(**{**TINY.__dict__, "rl": {**TINY.rl, "steps": 1}})
    reasoning_rl(model, w, half, tmp_path / "b", progress=False, checkpoint_every=1)
    # The same folder with the full config refuses the half run's checkpoint (another config) ...
    with pytest.raises(Exception, match="another GRPOConfig"):
        reasoning_rl(model, w, TINY, tmp_path / "b", progress=False)
    # ... and a stage that was stopped part-way continues to the same weights as an uninterrupted one.
    trainer = reasoning_rl(model, w, TINY, tmp_path / "c", progress=False, checkpoint_every=1)
    shutil.rmtree(tmp_path / "c" / "step-000002")
    resumed = reasoning_rl(model, w, TINY, tmp_path / "c", progress=False, checkpoint_every=1)
    assert same(resumed.model, full.model) and same(trainer.model, full.model)


def test_skips_share_folders_and_r1zero_is_all_skipped(tiny, tmp_path):
    model, w = tiny
    r1z = run_r1(model, w, TINY, tmp_path, skip=SKIPPABLE, progress=False)
    assert set(r1z["models"]) == {"reasoning_rl"} and r1z["folders"]["reasoning_rl"] == tmp_path / "reasoning_rl-nolang"
    assert "language" not in r1z["trainers"]["reasoning_rl"].rewards.parts
    nolang = run_r1(model, w, TINY, tmp_path, skip=("language",), progress=False)
    assert nolang["folders"]["all_scenarios_rl"].name == "all_scenarios_rl-nolang"
    no_sft = run_r1(model, w, TINY, tmp_path, skip=("rejection_sft",), progress=False)
    assert no_sft["folders"]["all_scenarios_rl"] == tmp_path / "cold_start" / "reasoning_rl" / "all_scenarios_rl"
    with pytest.raises(ValueError, match="skip"):
        run_r1(model, w, TINY, tmp_path, skip=("stage_5",))
    with pytest.raises(ValueError, match="skip"):
        run_r1(model, w, TINY, tmp_path, skip="cold_start")


def test_rejection_sft_trains_the_base_on_filtered_samples(tiny, tmp_path):
    model, w = tiny
    rl = cold_start(model, w, TINY)
    texts, info = rejection_sample(rl, w, TINY)
    assert info["kept"] + info["non_reasoning"] == len(texts) and info["kept"] <= info["problems"]
    for t in texts:
        q, completion = t.split(" <think>", 1)
        ops = [c for c in q[2:] if c in "+-"] if " plus " not in q and " minus " not in q else None
        lang = "sym" if ops is not None else "en"
        assert readable(completion) and reasoning_language(completion) in (lang, "none")
    sft, info2 = rejection_sft(model, rl, w, TINY, tmp_path, progress=False)
    loaded, info3 = rejection_sft(model, rl, w, TINY, tmp_path, progress=False)
    assert info2 == info3 == info and same(sft, loaded) and not same(sft, model)


def test_measure_r1_by_language(tiny):
    model, w = tiny
    s = sample_k(model, w, bilingual(w.heldout[:3]), 2, max_new_tokens=8, seed=0)
    m = measure_r1(s)
    assert set(m["by_language"]) == {"sym", "en"} and m["by_language"]["en"]["n"] == 6
    for key in ("consistency", "mixing", "readable", "check_parses"):
        assert 0.0 <= m[key] <= 1.0


def test_config_validation():
    for bad, field in [({"cold_start_steps": 0}, "cold_start_steps"), ({"language_weight": -1}, "language_weight"),
                       ({"rl": {"seed": 1}}, "rl"), ({"rl": {"group_size": 1}}, "group_size"),
                       ({"sft_lr": 0}, "sft_lr"), ({"non_reasoning": -1}, "non_reasoning")]:
        with pytest.raises(ValueError, match=field):
            R1Config(**bad)
    assert R1Config().grpo_config(4).steps == 30 and R1Config().grpo_config(2).steps == 60
    assert R1Config(seed=3).grpo_config(2).seed == 5
