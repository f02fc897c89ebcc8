"""Unit tests of dslib.world: problems, documents, the corpus, the tokenizer, the answer checker and packed batches."""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dslib.world import (CHARS, SPECIAL_TOKENS, STYLES, PackedData, Tokenizer, World, WorldConfig, is_correct,
                         parse_answer, sample_problem)

FAST = settings(max_examples=150, deadline=None)

# One reasoning step, in symbols ("07+35=42") or in words ("07 plus 35 is 42").
STEP_RE = re.compile(r"(\d+)(?:([+-])| (plus|minus) )(\d+)(?:=| is )(\d+)")


def parse_steps(think: str) -> list[tuple[int, str, int, int, str]]:
    """(a, op, b, result, language) of every step written in a think text."""
    out = []
    for m in STEP_RE.finditer(think):
        a, sym, word, b, r = m.groups()
        op = sym if sym else {"plus": "+", "minus": "-"}[word]
        out.append((int(a), op, int(b), int(r), "sym" if sym else "en"))
    return out


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


@pytest.fixture(scope="module")
def world() -> World:
    return World(n_docs=3000)


@pytest.fixture(scope="module")
def problems(world: World) -> list:
    rng = random.Random(123)
    return [world.sample_problem(rng) for _ in range(300)]


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and held-out problems


def test_same_config_gives_same_corpus_and_other_seed_differs():
    a = [d.text for d in World(n_docs=500).corpus()]
    b = [d.text for d in World(n_docs=500).corpus()]
    c = [d.text for d in World(n_docs=500, seed=1).corpus()]
    assert a == b
    assert a != c
    assert len(a) == len(c) == 500


def test_heldout_independent_of_corpus_seed_and_mix_but_not_heldout_seed():
    base = [p.text for p in World(n_docs=10).heldout]
    assert len(base) == 400 and len(set(base)) == 400
    assert [p.text for p in World(n_docs=10, seed=5).heldout] == base
    assert [p.text for p in World(n_docs=10, mix={"bare": 1.0}, en_rate=0.5).heldout] == base
    assert [p.text for p in World(n_docs=10, heldout_seed=7).heldout] != base


def test_heldout_not_in_default_corpus(world: World):
    held = {p.text for p in world.heldout}
    corpus = {d.problem.text for d in world.corpus()}
    assert len(held) == 400
    assert not held & corpus


def test_heldout_not_in_tiny_corpus_where_collisions_are_likely():
    tiny = dict(max_value=9, min_operands=3, max_operands=3, heldout_min_operands=3, heldout_max_operands=3,
                n_heldout=15)
    w = World(n_docs=2000, **tiny)
    held = {p.text for p in w.heldout}
    assert len(held) == 15
    # Without the ban, drawing this many problems would hit the held-out set: the check below is not vacuous.
    rng = random.Random(0)
    raw = {sample_problem(rng, w.config, 3).text for _ in range(2000)}
    assert raw & held
    assert not held & {d.problem.text for d in w.corpus()}


def test_heldout_too_many_for_difficulty_raises():
    w = World(n_docs=1, max_value=9, min_operands=2, max_operands=2, heldout_min_operands=2,
              heldout_max_operands=2, n_heldout=5000)
    with pytest.raises(ValueError, match="n_heldout"):
        w.heldout


# ---------------------------------------------------------------------------------------------------------------------
# Problems


@pytest.mark.parametrize("max_value", [9, 99, 999])
def test_problems_stay_in_range_and_answer_is_right(max_value: int):
    cfg = WorldConfig(max_value=max_value, n_docs=1)
    rng = random.Random(max_value)
    width = len(str(max_value))
    assert cfg.width == width
    for _ in range(300):
        k = rng.randint(2, 4)
        p = sample_problem(rng, cfg, k)
        assert len(p.operands) == k and len(p.ops) == k - 1
        assert all(0 <= x <= max_value for x in p.operands)
        assert all(0 <= v <= max_value for v in p.values)
        cur = p.operands[0]
        for op, x in zip(p.ops, p.operands[1:]):
            cur = cur + x if op == "+" else cur - x
        assert p.answer == cur == p.values[-1]
        numbers = re.split(r"[+-]", p.text)
        assert [int(n) for n in numbers] == list(p.operands)
        assert all(len(n) == width for n in numbers)
        assert re.findall(r"[+-]", p.text) == list(p.ops)


def test_ops_restriction_is_respected():
    cfg = WorldConfig(ops="+", n_docs=1)
    rng = random.Random(0)
    assert all(set(sample_problem(rng, cfg, 4).ops) == {"+"} for _ in range(100))


# ---------------------------------------------------------------------------------------------------------------------
# Documents


def check_chain(doc, steps) -> None:
    """The steps use the problem's operands and operators, and each starts from the previous result."""
    p = doc.problem
    assert [(op, b) for _, op, b, _, _ in steps] == list(zip(p.ops, p.operands[1:]))
    assert steps[0][0] == p.operands[0]
    for prev, cur in zip(steps, steps[1:]):
        assert cur[0] == prev[3]
    assert steps[-1][3] == doc.answer


def test_document_format(world: World, problems):
    for i, p in enumerate(problems[:50]):
        for style in STYLES:
            d = world.document(p, style, random.Random(i))
            assert d.text == f"Q:{p.text} <think>{d.think}</think> <answer> {p.fmt(d.answer)} </answer>"
            assert parse_answer(d.completion) == d.answer
            assert d.correct == (d.answer == p.answer)


def test_bare_documents(world: World, problems):
    for i, p in enumerate(problems):
        d = world.document(p, "bare", random.Random(i))
        assert d.think == "" and d.answer == p.answer and d.correct and not d.reflects


def test_guess_verify_documents(world: World, problems):
    guesses_right = 0
    for i, p in enumerate(problems):
        d = world.document(p, "guess_verify", random.Random(i))
        assert " wait " in d.think and d.reflects
        assert d.answer == p.answer
        guess, rest = d.think.split(" wait ", 1)
        assert re.fullmatch(r"\d+", guess) and 0 <= int(guess) <= world.config.max_value
        guesses_right += int(guess) == p.answer
        steps = parse_steps(rest)
        check_chain(d, steps)
        assert all(apply(a, op, b) == r for a, op, b, r, _ in steps)
    assert 0.15 < guesses_right / len(problems) < 0.45  # guess_right_rate = 0.3


def test_slip_fix_documents(world: World, problems):
    with_fix = 0
    for i, p in enumerate(problems):
        d = world.document(p, "slip_fix", random.Random(i))
        assert d.answer == p.answer and d.correct
        steps = parse_steps(d.think)
        if " wait " not in d.think:  # no slip fitted in range: plain right steps
            check_chain(d, steps)
            assert all(apply(a, op, b) == r for a, op, b, r, _ in steps)
            continue
        with_fix += 1
        assert d.think.count(" wait ") == 1
        wrong = [k for k, (a, op, b, r, _) in enumerate(steps) if apply(a, op, b) != r]
        assert len(wrong) == 1
        k = wrong[0]
        assert steps[k][:3] == steps[k + 1][:3]  # the same step, redone right just after " wait "
        check_chain(d, steps[:k] + steps[k + 1:])
    assert with_fix / len(problems) > 0.9


def test_slip_documents_have_one_uncorrected_slip(world: World, problems):
    slipped = 0
    for i, p in enumerate(problems):
        d = world.document(p, "slip", random.Random(i))
        assert " wait " not in d.think and not d.reflects
        steps = parse_steps(d.think)
        check_chain(d, steps)
        wrong = [k for k, (a, op, b, r, _) in enumerate(steps) if apply(a, op, b) != r]
        assert all(0 <= r <= world.config.max_value for *_, r, _ in steps)
        if wrong:  # the slip could be placed: the answer inherits it
            slipped += 1
            assert len(wrong) == 1
            assert d.answer != p.answer and not d.correct
        else:
            assert d.answer == p.answer
    assert slipped / len(problems) > 0.9


def test_steps_documents_without_slip_are_right(problems):
    w = World(n_docs=1, steps_slip_rate=0.0)
    for i, p in enumerate(problems):
        d = w.document(p, "steps", random.Random(i))
        steps = parse_steps(d.think)
        assert len(steps) == len(p.ops)
        check_chain(d, steps)
        assert all(apply(a, op, b) == r for a, op, b, r, _ in steps)
        assert [r for *_, r, _ in steps] == list(p.values[1:])
        assert d.correct and " wait " not in d.think


def test_steps_slip_rate_one_always_slips_when_possible(problems):
    w = World(n_docs=1, steps_slip_rate=1.0)
    docs = [w.document(p, "steps", random.Random(i)) for i, p in enumerate(problems)]
    assert sum(not d.correct for d in docs) / len(docs) > 0.9


@pytest.mark.parametrize("style", ["steps", "guess_verify", "slip_fix", "slip"])
def test_languages(world: World, problems, style: str):
    long = [p for p in problems if len(p.ops) >= 2]
    for i, p in enumerate(problems):
        for lang in ("sym", "en"):
            d = world.document(p, style, random.Random(i), language=lang)
            assert d.language == lang
            assert {s[4] for s in parse_steps(d.think)} == {lang}
            if lang == "en":
                assert not re.search(r"[+=-]", d.think) and (" plus " in d.think or " minus " in d.think)
            else:
                assert " plus " not in d.think and " minus " not in d.think and " is " not in d.think
    for i, p in enumerate(long):
        d = world.document(p, style, random.Random(i), language="mixed")
        assert d.language == "mixed"
        assert {s[4] for s in parse_steps(d.think)} == {"sym", "en"}
    one_step = next(p for p in problems if len(p.ops) == 1)
    d = world.document(one_step, style, random.Random(0), language="mixed")
    assert d.language in ("sym", "en")  # one step cannot switch language


def test_bad_style_and_language_raise(world: World, problems):
    with pytest.raises(ValueError, match="style"):
        world.document(problems[0], "essay")
    with pytest.raises(ValueError, match="language"):
        world.document(problems[0], "steps", language="fr")


# ---------------------------------------------------------------------------------------------------------------------
# Corpus mix


def test_corpus_mix_default():
    w = World(n_docs=5000)
    docs = w.corpus()
    assert len(docs) == 5000
    shares = Counter(d.style for d in docs)
    total = sum(w.config.mix.values())
    for style, weight in w.config.mix.items():
        assert abs(shares[style] / 5000 - weight / total) < 0.03, style


def test_corpus_mix_is_normalised():
    mix = {"bare": 3.0, "steps": 1.0}
    docs = World(n_docs=5000, mix=mix).corpus()
    shares = Counter(d.style for d in docs)
    assert set(shares) == {"bare", "steps"}
    assert abs(shares["bare"] / 5000 - 0.75) < 0.03
    assert abs(shares["steps"] / 5000 - 0.25) < 0.03


# ---------------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("overrides, field", [
    (dict(min_operands=3, max_operands=2), "max_operands"),
    (dict(min_operands=1), "min_operands"),
    (dict(ops="*"), "ops"),
    (dict(ops="++"), "ops"),
    (dict(ops=""), "ops"),
    (dict(n_docs=-1), "n_docs"),
    (dict(n_heldout=-5), "n_heldout"),
    (dict(seed=-1), "seed"),
    (dict(max_value=5), "max_value"),
    (dict(mix={"bare": 1.0, "poetry": 1.0}), "mix"),
    (dict(mix={}), "mix"),
    (dict(mix={"bare": 0.0, "steps": 0}), "mix"),
    (dict(mix={"bare": -1.0, "steps": 2.0}), "mix"),
    (dict(en_rate=1.5), "en_rate"),
    (dict(steps_slip_rate=-0.1), "steps_slip_rate"),
    (dict(guess_right_rate=2), "guess_right_rate"),
    (dict(en_rate=0.7, switch_rate=0.5), "switch_rate"),
    (dict(heldout_min_operands=4, heldout_max_operands=3), "heldout_max_operands"),
])
def test_world_config_validation(overrides: dict, field: str):
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field}="):
        WorldConfig(**overrides)
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field}="):
        World(**overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer

TOK = Tokenizer()
PIECES = list(CHARS) + list(SPECIAL_TOKENS)


@FAST
@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
def test_tokenizer_round_trip(text: str):
    ids = TOK.encode(text)
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids, skip=()) == text


def test_tokenizer_round_trip_documents(world: World):
    texts = [d.text for d in world.corpus()[:300]]
    for t in texts:
        assert TOK.decode(TOK.encode(t, bos=True, eos=True)) == t
    ids = TOK.encode(texts[0], bos=True, eos=True)
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id


def test_specials_are_single_tokens():
    assert TOK.vocab_size == len(SPECIAL_TOKENS) + len(CHARS) == len(TOK)
    for s in SPECIAL_TOKENS:
        assert TOK.encode(s) == [TOK.id(s)]
    assert len(set(TOK.id(s) for s in SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)
    ids = TOK.encode("12 wait 13")
    assert ids == [TOK.id("1"), TOK.id("2"), TOK.id(" wait "), TOK.id("1"), TOK.id("3")]
    ids = TOK.encode("Q:1+2 <think>x</think> <answer> 3 </answer>")
    for s in ("<think>", "</think>", "<answer>", "</answer>"):
        assert ids.count(TOK.id(s)) == 1
    assert TOK.encode("wait") == [TOK.id(c) for c in "wait"]  # without its spaces it is plain text
    with pytest.raises(ValueError):
        TOK.id("ab")


@pytest.mark.parametrize("text, pos", [
    ("caf\u00e9", 3),
    ("<think>\u4e2d", 7),
    ("a\x00b", 1),
    ("12 wait \ue001", 8),
    ("\ue003", 0),  # the private code point used for <think> internally must not smuggle in the token
    ("ok\U0001f600", 2),
])
def test_unknown_characters_raise_with_char_and_position(text: str, pos: int):
    with pytest.raises(ValueError) as e:
        TOK.encode(text)
    msg = str(e.value)
    assert f"U+{ord(text[pos]):04X}" in msg
    assert repr(text[pos]) in msg
    assert f"position {pos}" in msg


def test_encode_many_names_the_text_and_rejects_non_str():
    with pytest.raises(ValueError, match="text 2"):
        TOK.encode_many(["ab", "cd", "e\u00e9"])
    with pytest.raises(TypeError):
        TOK.encode_many(["ab", 5])


@FAST
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=20).map("".join), max_size=8), st.booleans(), st.booleans())
def test_encode_many_equals_encode(texts: list[str], bos: bool, eos: bool):
    many = TOK.encode_many(texts, bos=bos, eos=eos)
    assert len(many) == len(texts)
    assert [m.tolist() for m in many] == [TOK.encode(t, bos=bos, eos=eos) for t in texts]


def test_decode_rejects_out_of_range_ids():
    for bad in (-1, TOK.vocab_size, 10**6):
        with pytest.raises(ValueError, match=str(bad)):
            TOK.decode([TOK.id("a"), bad])
    assert TOK.decode([TOK.pad_id, TOK.id("a"), TOK.eos_id]) == "a"
    assert TOK.decode(torch.tensor([TOK.id("a"), TOK.id("b")])) == "ab"


# ---------------------------------------------------------------------------------------------------------------------
# Checker

ANSWER_CASE = re.compile(r"[ \t]*[+-]?[0-9]{1,12}[ \t]*")


@FAST
@given(st.text())
def test_parse_answer_never_raises_on_text(text: str):
    r = parse_answer(text)
    assert r is None or type(r) is int


@FAST
@given(st.binary())
def test_parse_answer_never_raises_on_decoded_bytes(b: bytes):
    for text in (b.decode("utf-8", errors="replace"), b.decode("latin-1")):
        r = parse_answer(text)
        assert r is None or type(r) is int


@FAST
@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=30))
def test_parse_answer_around_tags(before: str, inner: str, after: str):
    text = before + "<answer>" + inner + "</answer>" + after
    r = parse_answer(text)
    assert r is None or type(r) is int
    if "<answer>" not in before and ANSWER_CASE.fullmatch(inner):
        assert r == int(inner)
    if "<answer>" not in before and not ANSWER_CASE.fullmatch(inner) and "</answer>" not in inner:
        assert r is None  # the first answer tag holds something else


@FAST
@given(st.integers(min_value=0, max_value=10**9))
def test_parse_answer_reads_integers(n: int):
    assert parse_answer(f"<think>x</think> <answer> {n} </answer>") == n
    assert is_correct(f"<think>x</think> <answer> {n} </answer>", n)
    assert not is_correct(f"<think>x</think> <answer> {n} </answer>", n + 1)


@pytest.mark.parametrize("text, expected", [
    ("<answer> __import__('os') </answer>", None),
    ("<answer> __import__('os').system('true') </answer>", None),
    ("<answer> 1e3 </answer>", None),
    ("<answer> 0x10 </answer>", None),
    ("<answer> 4 2 </answer>", None),
    ("<answer> \u0664\u0662 </answer>", None),  # Arabic-Indic digits
    ("<answer> \uff14\uff12 </answer>", None),  # full-width digits
    ("<answer> 42.0 </answer>", None),
    ("<answer> 1_000 </answer>", None),
    ("<answer> </answer>", None),
    ("<answer><answer> 5 </answer></answer>", None),
    ("<answer> x </answer> <answer> 6 </answer>", None),
    ("<answer> 5 </answer> <answer> 6 </answer>", 5),
    ("<answer> 007 </answer>", 7),
    ("<answer>42</answer>", 42),
    ("<answer> -3 </answer>", -3),
    ("no tags at all 42", None),
    ("<answer> 42", None),
    ("42 </answer>", None),
])
def test_parse_answer_hostile_strings(text: str, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("<answer>" + " " * 10**6 + "5 </answer>", 5),
    ("<answer> 5" + " " * 10**6, None),
    ("<answer>" * 125_000, None),
    ("<answer> " + "1" * 10**6 + " </answer>", None),
    (("<answer> 1" + " " * 998) * 1000, None),
    ("x" * 10**6 + "<answer> 12 </answer>", 12),
    ("\u0664" * 10**6, None),
])
def test_parse_answer_long_strings_are_fast(text: str, expected):
    t = time.perf_counter()
    assert parse_answer(text) == expected
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("value", [None, 42, b"<answer> 5 </answer>", ["<answer> 5 </answer>"], 4.2,
                                   {"<answer>": 5}])
def test_parse_answer_non_str(value):
    assert parse_answer(value) is None
    assert is_correct(value, 5) is False


def test_grade(world: World):
    docs = [world.document(p, s, random.Random(0)) for p in world.heldout[:20] for s in ("bare", "slip")]
    probs = [d.problem for d in docs]
    assert world.grade([d.completion for d in docs], probs) == [d.correct for d in docs]
    assert world.grade(["<answer> x </answer>", None], probs[:2]) == [False, False]
    with pytest.raises(ValueError):
        world.grade(["a"], probs[:2])
    with pytest.raises(ValueError):
        world.grade([], None)  # the default problems are the 400 held-out ones


# ---------------------------------------------------------------------------------------------------------------------
# PackedData

SEQ = 128


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in World(n_docs=300).corpus()]


@pytest.fixture(scope="module")
def packed(texts) -> PackedData:
    return PackedData(texts, TOK, seq_len=SEQ, batch_size=4, seed=0)


def documents_of_rows(rows: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """(tokens, positions, response) of every document in packed rows, rebuilt from the segment ids."""
    out = []
    for r in range(len(rows["tokens"])):
        seg = rows["segments"][r]
        for s in sorted(set(seg.tolist()) - {0}):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # one document is one contiguous run
            out.append((tuple(rows["tokens"][r, idx].tolist()), rows["positions"][r, idx], rows["response"][r, idx]))
        assert (rows["tokens"][r, seg == 0] == TOK.pad_id).all()
    return out


@pytest.mark.parametrize("epoch", [0, 3])
def test_packed_rows_hold_every_document_whole(packed: PackedData, texts, epoch: int):
    rows = packed.epoch_rows(epoch)
    assert rows["tokens"].shape[1] == SEQ + 1
    docs = documents_of_rows(rows)
    want = Counter(tuple(TOK.encode(t, bos=True, eos=True)) for t in texts)
    assert Counter(d[0] for d in docs) == want
    for tokens, positions, _ in docs:
        assert positions.tolist() == list(range(len(tokens)))


def test_packed_response_is_after_think(packed: PackedData):
    think = TOK.id("<think>")
    for tokens, _, response in documents_of_rows(packed.epoch_rows(0)):
        k = tokens.index(think)
        assert response.tolist() == [i > k for i in range(len(tokens))]


def test_loss_mask_is_the_response_of_the_same_document(packed: PackedData):
    rows = packed.rows  # all_batches() visits the rows in packing order
    batches = packed.all_batches()
    mask = torch.cat([b["loss_mask"] for b in batches]).numpy()
    assert mask.dtype == bool and mask.shape == (len(rows["tokens"]), SEQ)
    think = TOK.id("<think>")
    for r in range(len(rows["tokens"])):
        tok, seg, pos = rows["tokens"][r], rows["segments"][r], rows["positions"][r]
        for i in range(SEQ):
            j = i + 1  # the target of input position i
            expected = bool(seg[i] == seg[j] and seg[j] > 0 and think in tok[j - pos[j]:j].tolist())
            assert mask[r, i] == expected, (r, i)


def test_loss_mask_covers_each_completion_once(packed: PackedData, texts):
    completions = Counter(t.split("<think>", 1)[1] + "<eos>" for t in texts)
    got = Counter()
    for b in packed.all_batches():
        for r in range(len(b["input_ids"])):
            seg, mask, tgt = b["segments"][r], b["loss_mask"][r], b["targets"][r]
            assert not mask[seg == 0].any()
            for s in set(seg.tolist()) - {0}:
                got[TOK.decode(tgt[(seg == s) & mask].tolist(), skip=())] += 1
    assert got == completions


def test_batch_is_pure_and_deterministic(packed: PackedData, texts):
    first = packed.batch(7)
    packed.batch(0)
    per_epoch = packed.rows_per_epoch // packed.batch_size
    packed.batch(per_epoch * 2 + 1)  # another epoch in between
    again = packed.batch(7)
    fresh = PackedData(texts, TOK, seq_len=SEQ, batch_size=4, seed=0).batch(7)
    for k in first:
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], fresh[k]), k
    other_seed = PackedData(texts, TOK, seq_len=SEQ, batch_size=4, seed=1).batch(7)
    assert not torch.equal(first["input_ids"], other_seed["input_ids"])
    assert torch.equal(first["targets"][:, :-1], first["input_ids"][:, 1:])


def test_steps_beyond_one_epoch(packed: PackedData):
    per_epoch = packed.rows_per_epoch // packed.batch_size
    a, b = packed.batch(0), packed.batch(per_epoch)
    assert b["input_ids"].shape[1] == SEQ
    assert not torch.equal(a["input_ids"], b["input_ids"])
    e0, e1 = packed.epoch_rows(0)["tokens"], packed.epoch_rows(1)["tokens"]
    assert not np.array_equal(e0[: min(len(e0), len(e1))], e1[: min(len(e0), len(e1))])


def test_every_batch_has_batch_size_rows(texts):
    data = PackedData(texts, TOK, seq_len=SEQ, batch_size=5)
    for step in range(4 * data.steps_per_epoch + 3):  # across several epochs
        assert data.batch(step)["input_ids"].shape == (5, SEQ), step


def test_an_epoch_visits_each_packed_row_at_most_once(texts):
    data = PackedData(texts, TOK, seq_len=SEQ, batch_size=4)
    packed_rows = {tuple(r) for r in data.rows["tokens"].tolist()}
    for epoch in (0, 1, 2):
        seen = []
        for k in range(data.steps_per_epoch):
            b = data.batch(epoch * data.steps_per_epoch + k)
            full = torch.cat([b["input_ids"], b["targets"][:, -1:]], dim=1)
            seen += [tuple(r) for r in full.tolist()]
        assert set(seen) <= packed_rows
        assert len(seen) == len(set(seen)) or len(packed_rows) < data.rows_per_epoch  # identical rows can repeat


def test_document_longer_than_row_raises(texts):
    with pytest.raises(ValueError, match="seq_len"):
        PackedData(texts + ["Q:" + "1" * 200 + " <think></think>"], TOK, seq_len=SEQ, batch_size=4)
    n = len(TOK.encode(texts[0], bos=True, eos=True))
    PackedData([texts[0]], TOK, seq_len=n - 1, batch_size=1)  # exactly seq_len + 1 fits
    with pytest.raises(ValueError, match="document 0"):
        PackedData([texts[0]], TOK, seq_len=n - 2, batch_size=1)


def test_packed_data_argument_errors(texts):
    with pytest.raises(ValueError):
        PackedData([], TOK, seq_len=SEQ, batch_size=4)
    with pytest.raises(ValueError):
        PackedData(texts, TOK, seq_len=1, batch_size=4)
    with pytest.raises(ValueError):
        PackedData(texts, TOK, seq_len=SEQ, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        PackedData(texts[:3], TOK, seq_len=SEQ, batch_size=8).batch(0)
