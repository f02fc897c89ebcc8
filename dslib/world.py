# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/00_foundations.py (chapter 00).
# Edit the chapter, then run the export again.

"""The arithmetic world: problems with verifiable answers, worked solutions in R1-Zero's format, the pretraining corpus,
the tokenizer and packed batches (chapter 00)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from dslib.checkpoint import atomic_write_text

STYLES = ("bare", "steps", "guess_verify", "slip_fix", "slip")
LANGUAGES = ("sym", "en")


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"WorldConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class WorldConfig:
    """The arithmetic world: difficulty, corpus mix and seeds (by default, the recipe of the course's pre-study).

    Problems are chains of 2-4 numbers (1-3 operations) joined by + and -, every number and every intermediate result in
    0..max_value, written zero-padded to the width of max_value ("07+35-12"). Held-out problems are longer (3-4 numbers)
    and never appear in the corpus.
    """

    max_value: int = 99
    min_operands: int = 2
    max_operands: int = 4
    ops: str = "+-"
    heldout_min_operands: int = 3
    heldout_max_operands: int = 4
    n_heldout: int = 400
    heldout_seed: int = 2024  # fixed: every chapter evaluates on the same held-out problems
    n_docs: int = 150_000
    seed: int = 0  # the corpus seed
    # The share of each solution style in the pretraining corpus.
    mix: dict[str, float] = field(default_factory=lambda: {
        "bare": 0.58, "steps": 0.08, "guess_verify": 0.26, "slip_fix": 0.03, "slip": 0.05})
    steps_slip_rate: float = 0.2  # share of "steps" solutions that carry one uncorrected slip
    guess_right_rate: float = 0.3  # how often the quick guess of "guess_verify" is right
    en_rate: float = 0.1  # share of worked solutions whose reasoning is written in words ("en") instead of symbols
    switch_rate: float = 0.05  # share of worked solutions that switch language part-way through
    # Chapter 07's bilingual world: problems can be stated in words ("07 plus 35"), and a solution then mostly reasons
    # in words too. At the defaults every problem is in symbols and the corpus is exactly chapter 00's.
    prompt_en_rate: float = 0.0  # share of problems stated in words
    en_prompt_consistency: float = 0.8  # share of worked solutions to a worded problem that reason in words

    def __post_init__(self) -> None:
        _check(isinstance(self.max_value, int) and 9 <= self.max_value <= 9999, "max_value", self.max_value,
               "an int in 9..9999")
        _check(isinstance(self.min_operands, int) and self.min_operands >= 2, "min_operands", self.min_operands,
               "an int >= 2")
        _check(isinstance(self.max_operands, int) and self.max_operands >= self.min_operands, "max_operands",
               self.max_operands, f"an int >= min_operands ({self.min_operands})")
        _check(isinstance(self.ops, str) and len(self.ops) > 0 and set(self.ops) <= set("+-")
               and len(set(self.ops)) == len(self.ops), "ops", self.ops, "a non-empty subset of '+-'")
        _check(isinstance(self.heldout_min_operands, int) and self.heldout_min_operands >= 2, "heldout_min_operands",
               self.heldout_min_operands, "an int >= 2")
        _check(isinstance(self.heldout_max_operands, int) and self.heldout_max_operands >= self.heldout_min_operands,
               "heldout_max_operands", self.heldout_max_operands,
               f"an int >= heldout_min_operands ({self.heldout_min_operands})")
        for name in ("n_heldout", "n_docs", "seed", "heldout_seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, name, v, "a non-negative int")
        _check(isinstance(self.mix, dict) and set(self.mix) <= set(STYLES) and len(self.mix) > 0, "mix", self.mix,
               f"a dict whose keys are among {STYLES}")
        _check(all(isinstance(w, (int, float)) and w >= 0 for w in self.mix.values()) and sum(self.mix.values()) > 0,
               "mix", self.mix, "non-negative weights with a positive sum")
        for name in ("steps_slip_rate", "guess_right_rate", "en_rate", "switch_rate", "prompt_en_rate",
                     "en_prompt_consistency"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, name, v, "a number in [0, 1]")
        _check(self.en_rate + self.switch_rate <= 1.0, "switch_rate", self.switch_rate,
               f"en_rate + switch_rate must be <= 1 (en_rate is {self.en_rate})")

    @property
    def width(self) -> int:
        """Digits per number: every number is zero-padded to this width."""
        return len(str(self.max_value))


@dataclass(frozen=True)
class Problem:
    """A chain like 07+35-12: operands, operators, and every intermediate value (values[-1] is the answer).
    language: how the problem is stated, in symbols ("sym": 07+35-12) or in words ("en": 07 plus 35 minus 12)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    width: int = 2
    language: str = "sym"

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"Problem.language={self.language!r} is invalid: one of {LANGUAGES}")

    @property
    def values(self) -> tuple[int, ...]:
        out, cur = [self.operands[0]], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            cur = cur + x if op == "+" else cur - x
            out.append(cur)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def text(self) -> str:
        s = self.fmt(self.operands[0])
        for op, x in zip(self.ops, self.operands[1:]):
            s += (op if self.language == "sym" else WORDS[op]) + self.fmt(x)
        return s

    def fmt(self, n: int) -> str:
        return f"{n:0{self.width}d}"

    def in_language(self, language: str) -> "Problem":
        """The same problem, stated in `language`."""
        return Problem(self.operands, self.ops, self.width, language)


def sample_problem(rng: random.Random, cfg: WorldConfig, n_operands: int) -> Problem:
    """A random chain of n_operands numbers whose every intermediate stays in 0..max_value."""
    m = cfg.max_value
    cur = rng.randint(0, m)
    operands, ops = [cur], []
    for _ in range(n_operands - 1):
        op = rng.choice(cfg.ops)
        x = rng.randint(0, m - cur) if op == "+" else rng.randint(0, cur)
        cur = cur + x if op == "+" else cur - x
        operands.append(x)
        ops.append(op)
    # Only a bilingual world draws the language, so the default world's random stream is chapter 00's.
    language = "en" if cfg.prompt_en_rate > 0 and rng.random() < cfg.prompt_en_rate else "sym"
    return Problem(tuple(operands), tuple(ops), cfg.width, language)


WORDS = {"+": " plus ", "-": " minus ", "=": " is "}


def render_step(a: str, op: str, b: str, result: str, language: str) -> str:
    """One step of worked reasoning, in symbols ("07+35=42") or in words ("07 plus 35 is 42")."""
    if language == "sym":
        return f"{a}{op}{b}={result}"
    return f"{a}{WORDS[op]}{b}{WORDS['=']}{result}"


@dataclass(frozen=True)
class Document:
    """One worked solution: the problem, how it was written, and the text in R1-Zero's format."""

    problem: Problem
    style: str
    language: str  # "sym", "en" or "mixed" ("sym" for a bare answer, which has no reasoning text)
    think: str
    answer: int

    @property
    def prompt(self) -> str:
        return prompt(self.problem)

    @property
    def completion(self) -> str:
        return f"{self.think}</think> <answer> {self.problem.fmt(self.answer)} </answer>"

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    @property
    def correct(self) -> bool:
        return self.answer == self.problem.answer

    @property
    def reflects(self) -> bool:
        return " wait " in self.think


def prompt(problem: Problem) -> str:
    """The compact R1-Zero prompt: the question, then an opened think tag for the model to continue."""
    return f"Q:{problem.text} <think>"


R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> "
    "reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def r1_zero_prompt(problem: Problem) -> str:
    """DeepSeek-R1's Table 1 template, verbatim, around a problem (too long for a 128-token model; shown for reference)."""
    return R1_ZERO_TEMPLATE.format(prompt=problem.text)


def _slipped_chain(problem: Problem, at: int, rng: random.Random, max_value: int) -> list[int] | None:
    """The chain's values when step `at` (1-based) gets a wrong result and later steps build on it; None if no slip
    keeps every later value in range."""
    vals = list(problem.values)
    for _ in range(20):
        delta = rng.choice((-1, 1)) * rng.randint(1, 9)
        wrong = vals[at] + delta
        if not 0 <= wrong <= max_value:
            continue
        out, cur = vals[:at] + [wrong], wrong
        ok = True
        for op, x in zip(problem.ops[at:], problem.operands[at + 1:]):
            cur = cur + x if op == "+" else cur - x
            if not 0 <= cur <= max_value:
                ok = False
                break
            out.append(cur)
        if ok:
            return out
    return None


def _steps(problem: Problem, values: Sequence[int], languages: Sequence[str], fix_at: int | None = None) -> str:
    """Render the chain's steps from `values` (possibly slipped). With fix_at, step fix_at is followed by " wait " and
    the same step redone right, and later steps continue from the right value."""
    f = problem.fmt
    parts, prev = [], values[0]
    true = problem.values
    for i, (op, x) in enumerate(zip(problem.ops, problem.operands[1:]), start=1):
        lang = languages[i - 1]
        if fix_at == i:
            parts.append(render_step(f(prev), op, f(x), f(values[i]), lang) + " wait "
                         + render_step(f(prev), op, f(x), f(true[i]), lang))
            values = list(true)
        else:
            parts.append(render_step(f(prev), op, f(x), f(values[i]), lang))
        prev = values[i]
    return " ".join(parts)


def make_document(problem: Problem, style: str, rng: random.Random, cfg: WorldConfig,
                  language: str | None = None) -> Document:
    """Write a solution of `problem` in `style` (one of STYLES). language: "sym", "en", "mixed" or None to draw it
    from the config's en_rate and switch_rate."""
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES}")
    n_steps = len(problem.ops)
    if language is None and problem.language == "en":  # a worded problem: mostly words, the rest split 2:1
        u, c = rng.random(), cfg.en_prompt_consistency
        language = "en" if u < c else "mixed" if u < c + (1 - c) / 3 else "sym"
    elif language is None:
        u = rng.random()
        language = "en" if u < cfg.en_rate else "mixed" if u < cfg.en_rate + cfg.switch_rate else "sym"
    if language not in ("sym", "en", "mixed"):
        raise ValueError(f"language {language!r} is not one of ('sym', 'en', 'mixed')")
    if language == "mixed" and n_steps < 2:
        language = rng.choice(LANGUAGES)
    if language == "mixed":
        first = rng.choice(LANGUAGES)
        other = "en" if first == "sym" else "sym"
        cut = rng.randint(1, n_steps - 1)
        languages = [first] * cut + [other] * (n_steps - cut)
    else:
        languages = [language] * n_steps
    true = list(problem.values)
    if style == "bare":
        return Document(problem, style, "sym", "", problem.answer)
    if style == "guess_verify":
        guess = problem.answer
        if rng.random() >= cfg.guess_right_rate:
            while guess == problem.answer:
                guess = min(cfg.max_value, max(0, problem.answer + rng.randint(-12, 12)))
        think = problem.fmt(guess) + " wait " + _steps(problem, true, languages)
        return Document(problem, style, language, think, problem.answer)
    slip = style in ("slip", "slip_fix") or (style == "steps" and rng.random() < cfg.steps_slip_rate)
    values, at = true, None
    if slip:
        at = rng.randint(1, n_steps)
        slipped = _slipped_chain(problem, at, rng, cfg.max_value)
        if slipped is None:  # no slip fits in range here: write the solution without one
            at = None
        else:
            values = slipped
    if style == "slip_fix" and at is not None:
        return Document(problem, style, language, _steps(problem, values, languages, fix_at=at), problem.answer)
    return Document(problem, style, language, _steps(problem, values, languages), values[-1])


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>", " wait ")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII
_PRIVATE = 0xE000  # specials are swapped for private-use code points while encoding
_PRIVATE_RE = re.compile("[\ue000-\uf8ff]")


class HFTokenizerFiles:
    """Tokenizer's export for Hugging Face transformers (the work is done by write_hf_tokenizer, section 5)."""

    def to_hf(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory, so that
        transformers.AutoTokenizer.from_pretrained(directory) gives this tokenizer's ids (see write_hf_tokenizer)."""
        return write_hf_tokenizer(self, directory, model_max_length)


class Tokenizer(HFTokenizerFiles):
    """Character-level tokenizer with single-token specials: <pad> <bos> <eos>, the think and answer tags, and " wait "
    (spaces included, so that the reflection word is one decision for the model)."""

    def __init__(self, specials: Sequence[str] = SPECIAL_TOKENS, chars: str = CHARS):
        self.specials = tuple(specials)
        self.chars = chars
        self.itos = list(self.specials) + list(chars)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        n = len(self.specials)
        self._lut = np.full(_PRIVATE + n, -1, dtype=np.int64)  # code point -> id
        for i, ch in enumerate(chars):
            self._lut[ord(ch)] = n + i
        self._lut[_PRIVATE:_PRIVATE + n] = np.arange(n)
        self._swap = sorted(((s, chr(_PRIVATE + i)) for i, s in enumerate(self.specials)), key=lambda p: -len(p[0]))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def id(self, token: str) -> int:
        """The id of a special token or a single character."""
        if token not in self.stoi:
            raise ValueError(f"{token!r} is not a token of this tokenizer")
        return self.stoi[token]

    pad_id = property(lambda self: self.stoi["<pad>"])
    bos_id = property(lambda self: self.stoi["<bos>"])
    eos_id = property(lambda self: self.stoi["<eos>"])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_many([text], bos=bos, eos=eos)[0].tolist()

    def encode_many(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        """Encode many texts at once (fast: one NumPy lookup over all of them). Raises ValueError naming the text,
        the position and the character that is not in the vocabulary."""
        swapped = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"can only encode str, got {type(t).__name__}")
            for a, b in self._swap:
                t = t.replace(a, b)
            swapped.append(t)
        joined = "".join(swapped)
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = self._lut[np.minimum(cps, len(self._lut) - 1)]
        if (ids < 0).any() or (cps >= len(self._lut)).any() or any(_PRIVATE_RE.search(t) for t in texts):
            for k, t in enumerate(texts):
                pos = self._first_unknown(t)
                if pos is not None:
                    raise ValueError(f"text {k}: character {t[pos]!r} (U+{ord(t[pos]):04X}) at position {pos} is not in "
                                     f"the vocabulary (newline, printable ASCII and the special tokens)")
        out, start = [], 0
        for t in swapped:
            piece = ids[start:start + len(t)]
            start += len(t)
            if bos or eos:
                piece = np.concatenate([[self.bos_id] if bos else [], piece, [self.eos_id] if eos else []]).astype(np.int64)
            out.append(piece)
        return out

    def _first_unknown(self, text: str) -> int | None:
        pos = 0
        while pos < len(text):
            special = next((s for s, _ in self._swap if text.startswith(s, pos)), None)
            if special is not None:
                pos += len(special)
            elif text[pos] in self.stoi:
                pos += 1
            else:
                return pos
        return None

    def decode(self, ids: Iterable[int], skip: Sequence[str] = ("<pad>", "<bos>", "<eos>")) -> str:
        skip_ids = {self.stoi[s] for s in skip}
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self.itos) - 1})")
            if i not in skip_ids:
                out.append(self.itos[i])
        return "".join(out)


_ANSWER_RE = re.compile(r"<answer>[ \t]*([+-]?[0-9]{1,12})[ \t]*</answer>", re.ASCII)


def parse_answer(text: object) -> int | None:
    """The integer inside the first <answer> ... </answer> of a model's output, or None. Never evaluates anything and
    never raises: a missing tag, a non-integer answer or a non-string input all give None."""
    if not isinstance(text, str):
        return None
    m = _ANSWER_RE.search(text)
    if m is None:
        return None
    inner_start = text.find("<answer>")
    if inner_start != m.start():  # the first answer tag holds something else: it is the one that counts
        return None
    return int(m.group(1))


def is_correct(text: object, answer: int) -> bool:
    """Does the first <answer> of `text` equal `answer`?"""
    got = parse_answer(text)
    return got is not None and got == answer


class World:
    """The arithmetic world: held-out problems, the pretraining corpus, a validation corpus and the tokenizer.

    Everything is a pure function of the config: the same config gives the same problems and texts on any machine.
    The held-out problems depend only on the difficulty and `heldout_seed`, never on the corpus seed or mix, so every
    chapter evaluates on the same problems; no held-out problem occurs in the corpus.
    """

    def __init__(self, config: WorldConfig | None = None, **overrides):
        if config is None:
            config = WorldConfig(**overrides)
        elif overrides:
            config = WorldConfig(**{**asdict(config), **overrides})
        self.config = config
        self.tokenizer = Tokenizer()
        self._heldout: list[Problem] | None = None
        self._corpus: list[Document] | None = None
        self._banned: set[tuple] | None = None

    def __repr__(self) -> str:
        c = self.config
        return (f"World({c.min_operands}-{c.max_operands} numbers in 0..{c.max_value}, ops {c.ops!r}, "
                f"{c.n_docs} documents, {c.n_heldout} held-out problems, seed {c.seed})")

    @property
    def heldout(self) -> list[Problem]:
        """The held-out problems, fixed by `heldout_seed` and the difficulty."""
        if self._heldout is None:
            c = self.config
            rng = random.Random(f"heldout-{c.heldout_seed}")
            seen: dict[str, Problem] = {}
            for _ in range(50 * c.n_heldout + 1000):
                if len(seen) == c.n_heldout:
                    break
                p = sample_problem(rng, c, rng.randint(c.heldout_min_operands, c.heldout_max_operands))
                seen.setdefault(p.text, p)
            if len(seen) < c.n_heldout:
                raise ValueError(f"WorldConfig.n_heldout={c.n_heldout} is invalid: only {len(seen)} distinct held-out "
                                 f"problems exist at this difficulty")
            self._heldout = list(seen.values())
        return self._heldout

    def sample_problem(self, rng: random.Random, n_operands: int | None = None) -> Problem:
        """A random training problem (never one of the held-out problems)."""
        c = self.config
        if self._banned is None:
            self._banned = {(p.operands, p.ops) for p in self.heldout}  # in either language
        banned = self._banned
        for _ in range(1000):
            k = n_operands if n_operands is not None else rng.randint(c.min_operands, c.max_operands)
            p = sample_problem(rng, c, k)
            if (p.operands, p.ops) not in banned:
                return p
        raise ValueError("could not draw a training problem outside the held-out set: the world is too small")

    def document(self, problem: Problem, style: str, rng: random.Random | None = None,
                 language: str | None = None) -> Document:
        return make_document(problem, style, rng or random.Random(0), self.config, language)

    def corpus(self) -> list[Document]:
        """The pretraining corpus: n_docs documents, styles drawn by the mix (cached after the first call)."""
        if self._corpus is None:
            c = self.config
            rng = random.Random(f"corpus-{c.seed}")
            styles = list(c.mix)
            weights = [c.mix[s] for s in styles]
            picks = rng.choices(styles, weights=weights, k=c.n_docs)
            self._corpus = [make_document(self.sample_problem(rng), s, rng, c) for s in picks]
        return self._corpus

    def validation(self, n: int | None = None) -> list[Document]:
        """Documents on the held-out problems, styles drawn by the mix: the held-out loss is measured on these."""
        c = self.config
        rng = random.Random(f"validation-{c.heldout_seed}-{c.seed}")
        styles = list(c.mix)
        problems = self.heldout if n is None else [self.heldout[i % len(self.heldout)] for i in range(n)]
        picks = rng.choices(styles, weights=[c.mix[s] for s in styles], k=len(problems))
        return [make_document(p, s, rng, c) for p, s in zip(problems, picks)]

    def prompts(self, problems: Sequence[Problem] | None = None) -> list[str]:
        """The prompts of problems (default: the held-out ones)."""
        return [prompt(p) for p in (self.heldout if problems is None else problems)]

    def grade(self, completions: Sequence[str], problems: Sequence[Problem] | None = None) -> list[bool]:
        """Is each completion's answer right? (Safe on any string: see parse_answer.)"""
        problems = self.heldout if problems is None else problems
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
        return [is_correct(c, p.answer) for c, p in zip(completions, problems)]


def corpus_stats(docs: Sequence[Document]) -> dict:
    """Shares of styles and languages, reflection and correctness rates, and lengths in characters."""
    n = len(docs)
    if n == 0:
        raise ValueError("corpus_stats needs at least one document")
    lengths = np.array([len(d.text) for d in docs])
    count = lambda key: {k: sum(1 for d in docs if key(d) == k) / n for k in sorted({key(d) for d in docs})}
    return {
        "documents": n,
        "style": count(lambda d: d.style),
        "language": count(lambda d: d.language),
        "n_operands": count(lambda d: len(d.problem.operands)),
        "reflection_rate": sum(d.reflects for d in docs) / n,
        "correct_rate": sum(d.correct for d in docs) / n,
        "mean_chars": float(lengths.mean()),
        "max_chars": int(lengths.max()),
    }


class PackedData:
    """Documents packed into fixed-length rows for pretraining, as a pure function of (seed, step).

    Each document is <bos> text <eos>; whole documents are packed greedily, in an order drawn from the seed, into rows of
    seq_len + 1 tokens (a document never spans two rows; the rest of a row is <pad>). A batch holds, per row: input_ids
    and targets (shifted by one), positions that restart at 0 in each document (for RoPE), segments (1, 2, ... per
    document, 0 for padding: attention stays inside a document), and loss_mask, true where the target is a response
    token (after <think>) of the same document.

    The rows are packed once; epoch e visits them in an order drawn from (seed, e). Since attention and positions are
    per document, which documents share a row changes nothing in the loss, so a fresh row order per epoch is as good as
    repacking. batch(step) never depends on history: a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 response_after: str = "<think>"):
        if not isinstance(seq_len, int) or not isinstance(batch_size, int) or seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be an int >= 2 and batch_size an int >= 1, got {seq_len!r} and "
                             f"{batch_size!r}")
        if len(docs) == 0:
            raise ValueError("PackedData needs at least one document")
        self.tokenizer, self.seq_len, self.batch_size, self.seed = tokenizer, seq_len, batch_size, seed
        encoded = tokenizer.encode_many(list(docs), bos=True, eos=True)
        lengths = np.array([len(d) for d in encoded])
        too_long = np.flatnonzero(lengths > seq_len + 1)
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(f"document {i} has {lengths[i]} tokens with <bos> and <eos>, more than a row of "
                             f"seq_len + 1 = {seq_len + 1}: raise seq_len")
        order = np.random.default_rng([seed, 0]).permutation(len(encoded))
        width = seq_len + 1
        row_of = np.empty(len(order), np.int64)
        offset = np.empty(len(order), np.int64)
        row, used = 0, 0
        for k, i in enumerate(order):  # greedy: start a new row when the document does not fit
            if used + lengths[i] > width:
                row, used = row + 1, 0
            row_of[k], offset[k] = row, used
            used += lengths[i]
        lens = lengths[order]
        flat = np.concatenate([encoded[i] for i in order])
        local = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)  # position within its document
        where = np.repeat(row_of * width + offset, lens) + local  # flat index into the (rows, width) arrays
        # The response is every token after the first `response_after` token of its document.
        marker = tokenizer.id(response_after)
        first = np.minimum.reduceat(np.where(flat == marker, local, width), np.cumsum(lens) - lens)
        shape = (row + 1, width)
        self.rows = {"tokens": np.full(shape, tokenizer.pad_id, np.int64), "segments": np.zeros(shape, np.int64),
                     "positions": np.zeros(shape, np.int64), "response": np.zeros(shape, bool)}
        self.rows["tokens"].flat[where] = flat
        self.rows["segments"].flat[where] = np.repeat(np.arange(len(order)) - np.searchsorted(row_of, row_of) + 1, lens)
        self.rows["positions"].flat[where] = local
        self.rows["response"].flat[where] = local > np.repeat(first, lens)
        if shape[0] < batch_size:
            raise ValueError(f"the documents pack into {shape[0]} rows, fewer than batch_size {batch_size}")
        self.n_documents = len(encoded)

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows["tokens"])

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_epoch // self.batch_size

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        """All packed rows (seq_len + 1 wide) in the order epoch `epoch` visits them."""
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
        return {k: a[order] for k, a in self.rows.items()}

    def batch(self, step: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The batch for optimizer step `step` (0-based): batch_size rows; an epoch's leftover rows are skipped."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
        pick = order[k * self.batch_size:(k + 1) * self.batch_size]
        return rows_to_batch({name: a[pick] for name, a in self.rows.items()}, device)

    def all_batches(self, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
        """Every row once, in packing order, in batches (the last one may be smaller): for evaluation."""
        n = self.rows_per_epoch
        return [rows_to_batch({k: a[s:s + self.batch_size] for k, a in self.rows.items()}, device)
                for s in range(0, n, self.batch_size)]


def rows_to_batch(rows: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in rows.items()}
    seg = t["segments"]
    return {
        "input_ids": t["tokens"][:, :-1],
        "targets": t["tokens"][:, 1:],
        "positions": t["positions"][:, :-1],
        "segments": seg[:, :-1],
        "loss_mask": (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & t["response"][:, 1:],
    }


def write_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, model_max_length: int | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory, so that
    transformers.AutoTokenizer.from_pretrained(directory) gives the ids of `tokenizer`: a WordLevel model over the same
    vocabulary, one piece per character, every special token an added token matched before the characters are split,
    and a post-processor that puts <bos> in front (tok(text) is tokenizer.encode(text, bos=True), as the course
    encodes prompts; add_special_tokens=False gives encode(text)). <pad>, <bos> and <eos> are marked special, so
    skip_special_tokens drops them as decode does; the tags and " wait " are not. A character outside the vocabulary
    is an error there too (WordLevel has no unknown token). Each file is written to a temporary name and renamed."""
    try:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ImportError("Tokenizer.to_hf needs the `tokenizers` package (it comes with transformers): "
                          "pip install tokenizers") from e
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder: Tokenizer.to_hf writes files into a folder")
    roles = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    marked = {role: s for role, s in roles.items() if s in tokenizer.specials}  # the tokens decode skips
    hf = HFTokenizer(models.WordLevel(dict(tokenizer.stoi), unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character its own piece
    hf.decoder = decoders.Fuse()  # decoding joins the pieces with nothing between them
    hf.add_tokens([AddedToken(s, normalized=False, special=False)
                   for s in tokenizer.specials if s not in marked.values()])
    hf.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in marked.values()])
    if "bos_token" in marked:
        hf.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", tokenizer.bos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **marked, "clean_up_tokenization_spaces": False,
              "padding_side": "left"}  # left: a batch of prompts ends at the same column, as generation needs
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    atomic_write_text(directory / "tokenizer.json", hf.to_str(pretty=True))
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(marked, indent=2) + "\n")
    return directory
