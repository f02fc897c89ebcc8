# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/01_scaling_laws.py (chapter 01).
# Edit the chapter, then run the export again.

"""Scaling laws as DeepSeek LLM fits them: FLOP accounting, a shape rule, IsoFLOP sweeps with a disk cache, and
power-law fits with bootstrap intervals (chapter 01)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def _positive(name: str, value, integer: bool = False) -> None:
    """Raise ValueError naming `name` unless value is a positive finite number (an int when `integer`)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if number and integer:
        number = float(value).is_integer()
    if not number or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: {'a positive int' if integer else 'a positive number'} "
                         f"is required")


def flops_per_token(n_layer: int, d_model: int, seq_len: int) -> float:
    """DeepSeek LLM's model scale M (arXiv 2401.02954, section 3.2): non-embedding FLOPs per token of training,
    forward and backward, M = 72 n_layer d_model^2 + 12 n_layer d_model seq_len.

    The first term is 6N1 (six FLOPs per non-embedding parameter, 12 d_model^2 of them per layer); the second is the
    attention over seq_len positions, which 6N leaves out. The vocabulary is not counted. Training on D tokens costs
    C = M D FLOPs."""
    _positive("n_layer", n_layer, integer=True)
    _positive("d_model", d_model, integer=True)
    _positive("seq_len", seq_len, integer=True)
    return 72.0 * n_layer * d_model**2 + 12.0 * n_layer * d_model * seq_len


def six_n1(n_layer: int, d_model: int) -> float:
    """6N1 = 72 n_layer d_model^2: six FLOPs per non-embedding parameter (DeepSeek LLM, section 3.2, Table 3)."""
    _positive("n_layer", n_layer, integer=True)
    _positive("d_model", d_model, integer=True)
    return 72.0 * n_layer * d_model**2


def six_n2(n_layer: int, d_model: int, n_vocab: int) -> float:
    """6N2 = 72 n_layer d_model^2 + 6 n_vocab d_model: 6N with the vocabulary's parameters counted (DeepSeek LLM,
    section 3.2, Table 3)."""
    _positive("n_vocab", n_vocab, integer=True)
    return six_n1(n_layer, d_model) + 6.0 * n_vocab * d_model


@dataclass(frozen=True)
class Shape:
    """A model's shape: layers, width, attention heads and the sequence length it trains on."""

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int

    @property
    def M(self) -> float:
        """Non-embedding FLOPs per token (flops_per_token)."""
        return flops_per_token(self.n_layer, self.d_model, self.seq_len)

    @property
    def aspect_ratio(self) -> float:
        """d_model / n_layer."""
        return self.d_model / self.n_layer


def shape_for(M: float, seq_len: int, aspect_ratio: float = 32.0, n_head: int = 2,
              multiple: int | None = None) -> Shape:
    """The shape whose model scale M (flops_per_token) is closest to the target M, in ratio, at a fixed aspect ratio.

    d_model runs over the multiples of `multiple` (default 2 n_head: the smallest step that splits every width into
    n_head heads of an even width, as RoPE needs); for each width, n_layer = max(1, round(d_model / aspect_ratio)) is
    the depth nearest the aspect ratio. M grows with d_model, so the search stops at the first shape above the
    target."""
    _positive("M", M)
    _positive("seq_len", seq_len, integer=True)
    _positive("aspect_ratio", aspect_ratio)
    _positive("n_head", n_head, integer=True)
    multiple = 2 * n_head if multiple is None else multiple
    _positive("multiple", multiple, integer=True)
    if multiple % (2 * n_head):
        raise ValueError(f"multiple={multiple} is invalid: it must be a multiple of 2 n_head = {2 * n_head}, so that "
                         f"every width splits into {n_head} heads of an even width")
    best, best_error, d_model = None, math.inf, 0
    while True:
        d_model += multiple
        shape = Shape(max(1, math.floor(d_model / aspect_ratio + 0.5)), d_model, n_head, seq_len)
        error = abs(math.log(shape.M / M))
        if error < best_error:
            best, best_error = shape, error
        if shape.M >= M:
            return best


def shape_ladder(seq_len: int, n: int, aspect_ratio: float = 32.0, n_head: int = 2,
                 multiple: int | None = None) -> list[Shape]:
    """The first n shapes of shape_for's grid, smallest first: widths multiple, 2 multiple, ..., each at the depth
    nearest the aspect ratio."""
    _positive("n", n, integer=True)
    shape_for(1.0, seq_len, aspect_ratio, n_head, multiple)  # checks the arguments
    multiple = 2 * n_head if multiple is None else multiple
    return [Shape(max(1, math.floor(d / aspect_ratio + 0.5)), d, n_head, seq_len)
            for d in range(multiple, (n + 1) * multiple, multiple)]


def size_window(ladder: Sequence[Shape], centre: float, n: int = 5) -> list[Shape]:
    """The n consecutive shapes of `ladder` (sorted by M) whose geometric-mean M is nearest `centre`: an IsoFLOP
    curve's sizes, spread around where its minimum is expected."""
    _positive("centre", centre)
    _positive("n", n, integer=True)
    ladder = sorted(ladder, key=lambda s: s.M)
    if len(ladder) < n:
        raise ValueError(f"the ladder has {len(ladder)} shapes, fewer than n={n}")
    logs = np.log([s.M for s in ladder])
    start = min(range(len(ladder) - n + 1), key=lambda i: abs(logs[i:i + n].mean() - math.log(centre)))
    return ladder[start:start + n]


@dataclass(frozen=True)
class HyperparameterLaw:
    """DeepSeek LLM's Eq. 1 (arXiv 2401.02954, section 3.1): the learning rate and the batch size (in tokens) that a
    compute budget C (FLOPs) calls for, eta_opt = lr_k C^lr_exponent and B_opt = batch_k C^batch_exponent."""

    lr_k: float
    lr_exponent: float
    batch_k: float
    batch_exponent: float

    def __post_init__(self) -> None:
        for name in ("lr_k", "batch_k"):
            _positive(f"HyperparameterLaw.{name}", getattr(self, name))
        for name in ("lr_exponent", "batch_exponent"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"HyperparameterLaw.{name}={value!r} is invalid: a finite number is required")

    def lr(self, C):
        """The learning rate for budget C (a number or an array of them)."""
        return self.lr_k * _positive_array("C", C) ** self.lr_exponent

    def batch_tokens(self, C):
        """The batch size in tokens for budget C."""
        return self.batch_k * _positive_array("C", C) ** self.batch_exponent

    def batch_rows(self, C: float, seq_len: int) -> int:
        """The batch size in rows of seq_len tokens: batch_tokens(C) / seq_len, rounded, at least 1."""
        _positive("seq_len", seq_len, integer=True)
        return max(1, round(float(self.batch_tokens(C)) / seq_len))


def _positive_array(name: str, values) -> np.ndarray | float:
    """values as float (a scalar) or a float array, after checking that every one is positive and finite."""
    array = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(array)) or not np.all(array > 0):
        raise ValueError(f"{name}={values!r} is invalid: positive finite numbers are required")
    return float(array) if array.ndim == 0 else array


# DeepSeek LLM's fit, Eq. 1: eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 (C in FLOPs, B in tokens).
DEEPSEEK_HYPERPARAMETERS = HyperparameterLaw(lr_k=0.3118, lr_exponent=-0.1250, batch_k=0.2920, batch_exponent=0.3271)


SWEEP_VERSION = 1  # part of every cache key: raise it when train_run changes what a run computes
MIN_STEPS = 20  # plans refuse runs shorter than this: warm-up and the schedule's stages need room


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run of an IsoFLOP sweep or a hyperparameter grid, and so its cache key.

    The model is a dslib Transformer (SwiGLU width 8/3 d_model, rounded, so that a layer has 12 d_model^2
    parameters as flops_per_token assumes); it trains on the world's corpus (World(n_docs, seed=world_seed)) packed into
    rows of seq_len tokens, batch_size rows a step, for `steps` steps: tokens = steps x batch_size x seq_len positions.
    `budget` is a label, the compute budget C the run belongs to: it changes nothing in the run and is not in the key.
    """

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    schedule: str = "multistep"
    seed: int = 0
    n_docs: int = 50_000
    world_seed: int = 0
    threads: int = 1
    device: str = "cpu"
    budget: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "seq_len", "batch_size", "steps", "n_docs", "threads"):
            _positive(f"RunSpec.{name}", getattr(self, name), integer=True)
        _positive("RunSpec.lr", self.lr)
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"RunSpec.n_head={self.n_head} is invalid: d_model={self.d_model} must split into "
                             f"heads of an even width")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"RunSpec.warmup_steps={self.warmup_steps!r} is invalid: an int in [0, steps={self.steps})"
                             f" is required")
        if self.schedule not in ("multistep", "cosine"):
            raise ValueError(f"RunSpec.schedule={self.schedule!r} is invalid: 'multistep' or 'cosine' is required")
        for name in ("seed", "world_seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"RunSpec.{name}={getattr(self, name)!r} is invalid: a non-negative int is required")
        if self.budget is not None:
            _positive("RunSpec.budget", self.budget)

    @property
    def M(self) -> float:
        """Non-embedding FLOPs per token."""
        return flops_per_token(self.n_layer, self.d_model, self.seq_len)

    @property
    def tokens(self) -> int:
        """D: token positions trained on (steps x batch_size x seq_len)."""
        return self.steps * self.batch_size * self.seq_len

    @property
    def flops(self) -> float:
        """C = M D, the compute this run actually spends (the budget, up to the rounding of steps)."""
        return self.M * self.tokens

    def key(self) -> str:
        """A hash of everything that determines the run's result (all fields but `budget`, and SWEEP_VERSION)."""
        identity = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "budget"}
        text = json.dumps({"version": SWEEP_VERSION, **identity}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@lru_cache(maxsize=2)
def _corpus(n_docs: int, world_seed: int):
    """The world's tokenizer, pretraining texts and validation texts (built once per process)."""
    from dslib.world import World

    world = World(n_docs=n_docs, seed=world_seed)
    return world.tokenizer, [d.text for d in world.corpus()], [d.text for d in world.validation()]


@lru_cache(maxsize=4)
def _packed(n_docs: int, world_seed: int, seq_len: int, seed: int):
    """The corpus packed into rows (packing does not depend on the batch size), and the validation batches."""
    from dslib.world import PackedData

    tokenizer, texts, valid = _corpus(n_docs, world_seed)
    return (PackedData(texts, tokenizer, seq_len, 1, seed=seed),
            PackedData(valid, tokenizer, seq_len, 64, seed=0).all_batches())


def train_run(spec: RunSpec, return_model: bool = False):
    """Train the run's model and measure its held-out loss: the record that a sweep caches.

    The loss is dslib.train.evaluate_loss on the world's 400 validation documents (worked solutions of the held-out
    problems, none of them in the corpus): the mean cross-entropy per response token, that is per character-level
    token after <think> up to and including <eos>, in nats and in bits (nats / ln 2); a run whose training loss
    became NaN or infinite reports an infinite loss and diverged=True. Deterministic: the model's
    initialisation and the data order come from spec.seed, and PyTorch runs on spec.threads threads.
    return_model: also return the trained model, as (record, model)."""
    import torch

    from dslib.train import NonFiniteLossError, TrainConfig, Trainer, evaluate_loss
    from dslib.transformer import Transformer, TransformerConfig

    packed, valid = _packed(spec.n_docs, spec.world_seed, spec.seq_len, spec.seed)
    data = copy.copy(packed)  # the same packed rows, batched batch_size at a time
    data.batch_size = spec.batch_size
    if data.steps_per_epoch < 1:
        raise ValueError(f"RunSpec.batch_size={spec.batch_size} is invalid: the corpus packs into only "
                         f"{packed.rows_per_epoch} rows")
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        torch.manual_seed(spec.seed)
        config = TransformerConfig(vocab_size=packed.tokenizer.vocab_size, d_model=spec.d_model,
                                   n_layer=spec.n_layer, n_head=spec.n_head, max_seq_len=spec.seq_len,
                                   intermediate_size=max(1, round(8 * spec.d_model / 3)))
        model = Transformer(config)
        trainer = Trainer(model, data, TrainConfig(steps=spec.steps, lr=spec.lr, warmup_steps=spec.warmup_steps,
                                                   schedule=spec.schedule, eval_every=0, seed=spec.seed),
                          device=spec.device)
        start = time.perf_counter()
        try:
            history = trainer.fit(progress=False)
        except NonFiniteLossError:  # the run diverged: a result too (a learning rate too high), not an error
            history = None
        seconds = time.perf_counter() - start
        nats = evaluate_loss(model, valid) if history is not None else math.inf
    finally:
        torch.set_num_threads(threads)
    train_nats = float(np.mean(history["loss"][-max(1, spec.steps // 10):])) if history is not None else math.inf
    record = {"loss_nats": nats, "loss_bits": nats / math.log(2), "train_loss_bits": train_nats / math.log(2),
              "diverged": history is None, "params": model.num_params(embeddings=False), "seconds": seconds}
    return (record, model) if return_model else record


def cache_dir() -> Path:
    """Where finished runs are cached: $DSLIB_CACHE/scaling when DSLIB_CACHE is set, else _build/cache/scaling
    under the course's root (the folder holding book.toml; DSLIB_BUILD moves _build)."""
    env = os.environ.get("DSLIB_CACHE", "").strip()
    if env:
        return Path(env).expanduser() / "scaling"
    from dslib.book import build_dir

    return build_dir() / "cache" / "scaling"


def _read_cached(path: Path, spec: RunSpec) -> dict | None:
    """A cached record, or None when the file is missing, unreadable or belongs to another spec."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    identity = {k: v for k, v in asdict(spec).items() if k != "budget"}
    if not isinstance(record, dict) or record.get("spec") != identity or "result" not in record:
        return None
    return record["result"]


def _write_cached(path: Path, spec: RunSpec, result: dict) -> None:
    """Write a record atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = {k: v for k, v in asdict(spec).items() if k != "budget"}
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"spec": identity, "result": result}, indent=1) + "\n", encoding="utf-8")
    temporary.replace(path)


_POOLS: dict = {}


def _pool(workers: int):
    """A pool of `workers` processes, kept for later sweeps (their corpus stays built). Processes are spawned, not
    forked: forking a process that has run PyTorch can hang."""
    if workers not in _POOLS:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _POOLS[workers]


def _run_in_worker(fields: dict) -> dict:
    """A worker process's job: the run described by `fields` (a RunSpec's fields)."""
    return train_run(RunSpec(**fields))


def shutdown_workers() -> None:
    """Stop the worker processes that sweeps keep for later calls."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.shutdown(cancel_futures=True)


def sweep(specs: Sequence[RunSpec], cache: str | Path | None = None, workers: int = 1, progress: bool = True,
          desc: str = "runs") -> list[dict]:
    """Run every spec (or read it from the cache) and return one record per spec, in order: the spec's fields, its
    M, tokens and flops, and train_run's measurements (loss_bits, loss_nats, ...), plus `cached` (True when the
    record came from disk).

    Each finished run is written to <cache>/<spec.key()>.json at once, so an interrupted sweep resumes where it
    stopped and a rerun trains nothing it has already trained. cache: a folder (default cache_dir()).
    workers: processes that train in parallel (1: in this process); they run dslib.scaling.train_run, so they see
    the exported module, not a notebook's edits that were not exported. Runs are deterministic whatever the number."""
    specs = list(specs)
    for i, spec in enumerate(specs):
        if not isinstance(spec, RunSpec):
            raise TypeError(f"specs[{i}] is a {type(spec).__name__}, not a RunSpec")
    _positive("workers", workers, integer=True)
    folder = Path(cache) if cache is not None else cache_dir()
    results: dict[str, dict] = {}
    cached: set[str] = set()
    todo: dict[str, RunSpec] = {}
    for spec in specs:
        key = spec.key()
        if key in results or key in todo:
            continue
        found = _read_cached(folder / f"{key}.json", spec)
        if found is None:
            todo[key] = spec
        else:
            results[key] = found
            cached.add(key)
    bar = tqdm(total=len(results) + len(todo), initial=len(results), desc=desc, disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for key, spec in todo.items():
                bar.set_postfix_str(f"d_model {spec.d_model}, {spec.n_layer} layers, {spec.steps} steps")
                results[key] = train_run(spec)
                _write_cached(folder / f"{key}.json", spec, results[key])
                bar.update(1)
        else:
            from concurrent.futures import as_completed

            from dslib import scaling  # workers import the exported module by name, and get plain fields to run

            pool = _pool(workers)
            # Longest first, so that no long run starts last while the other workers sit idle.
            order = sorted(todo, key=lambda k: -todo[k].steps * todo[k].batch_size * todo[k].n_layer)
            futures = {pool.submit(scaling._run_in_worker, asdict(todo[key])): key for key in order}
            try:
                for future in as_completed(futures):
                    key = futures[future]
                    results[key] = future.result()
                    _write_cached(folder / f"{key}.json", todo[key], results[key])
                    bar.update(1)
            finally:
                for future in futures:  # on an error or an interrupt, start nothing more
                    future.cancel()
    finally:
        bar.close()
    return [{**asdict(spec), "M": spec.M, "tokens": spec.tokens, "flops": spec.flops, **results[spec.key()],
             "cached": spec.key() in cached} for spec in specs]


def plan_run(budget: float, shape: Shape, batch_size: int, lr: float, warmup: float = 0.1,
             min_steps: int = MIN_STEPS, **options) -> RunSpec:
    """The run that spends `budget` FLOPs on a model of this shape: D = C / M tokens, steps = D / (batch_size x
    seq_len) rounded, warm-up a `warmup` fraction of the steps. Refuses (ValueError) a run of fewer than min_steps
    steps. options: other RunSpec fields (schedule, seed, n_docs, device, ...)."""
    _positive("budget", budget)
    _positive("batch_size", batch_size, integer=True)
    steps = round(budget / (shape.M * batch_size * shape.seq_len))
    if steps < min_steps:
        raise ValueError(f"budget={budget:.3g} FLOPs buys only {steps} steps of {batch_size} x {shape.seq_len} tokens "
                         f"for d_model={shape.d_model}, n_layer={shape.n_layer} (M={shape.M:.3g}), fewer than "
                         f"min_steps={min_steps}: raise the budget, or use a smaller model or batch")
    return RunSpec(n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head, seq_len=shape.seq_len,
                   batch_size=batch_size, steps=steps, lr=float(lr), warmup_steps=max(1, round(warmup * steps)),
                   budget=float(budget), **options)


def plan_isoflop(budgets: Sequence[float], sizes: Callable[[float], Sequence[float]] | Sequence[float],
                 law: HyperparameterLaw, seq_len: int, aspect_ratio: float = 32.0, n_head: int = 2,
                 multiple: int | None = None, **options) -> list[RunSpec]:
    """An IsoFLOP sweep: for each budget C, one run per model size, each trained on D = C / M tokens with the batch
    size and learning rate that `law` gives for C (DeepSeek LLM, section 3.2: "hyperparameters set by Eq. 1").

    sizes: target model scales M (or Shapes), the same for every budget, or a function of C that returns them. A
    target M becomes a shape by shape_for; targets that give the same shape are run once. options: plan_run's
    options."""
    for i, budget in enumerate(budgets):
        _positive(f"budgets[{i}]", budget)
    specs = []
    for budget in budgets:
        targets = list(sizes(budget) if callable(sizes) else sizes)
        if not targets:
            raise ValueError(f"no model sizes for budget {budget:.3g}")
        shapes = []
        for target in targets:
            shape = target if isinstance(target, Shape) else shape_for(target, seq_len, aspect_ratio, n_head, multiple)
            if shape not in shapes:
                shapes.append(shape)
        for shape in sorted(shapes, key=lambda s: s.M):
            specs.append(plan_run(budget, shape, law.batch_rows(budget, seq_len), float(law.lr(budget)), **options))
    return specs


@dataclass(frozen=True)
class PowerLawFit:
    """y = k x^exponent, fitted by least squares in log-log space, with bootstrap percentile intervals."""

    k: float
    exponent: float
    k_interval: tuple[float, float]
    exponent_interval: tuple[float, float]
    n_points: int
    confidence: float
    k_samples: np.ndarray = field(repr=False, compare=False)
    exponent_samples: np.ndarray = field(repr=False, compare=False)

    def predict(self, x):
        """k x^exponent, for a number or an array."""
        return self.k * _positive_array("x", x) ** self.exponent

    def band(self, x, confidence: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap fits at x (default: the fit's confidence)."""
        x = np.atleast_1d(_positive_array("x", x))
        tail = (1 - (self.confidence if confidence is None else confidence)) / 2 * 100
        logs = np.log(self.k_samples)[:, None] + self.exponent_samples[:, None] * np.log(x)[None, :]  # no overflow
        return np.exp(np.percentile(logs, tail, axis=0)), np.exp(np.percentile(logs, 100 - tail, axis=0))

    def __str__(self) -> str:
        (k_lo, k_hi), (a_lo, a_hi) = self.k_interval, self.exponent_interval
        return (f"{self.k:.4g} x^{self.exponent:.4f}  (exponent {a_lo:.4f}..{a_hi:.4f}, k {k_lo:.4g}..{k_hi:.4g}; "
                f"{self.confidence:.0%} bootstrap, {self.n_points} points)")


def _check_points(x, y, minimum: int = 3, names: tuple[str, str] = ("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    """x and y as 1-D float arrays of equal length, at least `minimum` points, every value positive and finite."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{names[0]} and {names[1]} must be 1-D sequences of numbers")
    if len(x) != len(y):
        raise ValueError(f"{names[0]} and {names[1]} have mismatched lengths ({len(x)} and {len(y)})")
    if len(x) < minimum:
        raise ValueError(f"too few points to fit: {len(x)} given, at least {minimum} needed")
    for name, values in zip(names, (x, y)):
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if len(bad):
            raise ValueError(f"{name} must be positive and finite: {name}[{bad[0]}] = {values[bad[0]]!r}"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return x, y


def _line(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept of v against u, row by row (u, v: (..., n))."""
    du = u - u.mean(axis=-1, keepdims=True)
    dv = v - v.mean(axis=-1, keepdims=True)
    slope = (du * dv).sum(axis=-1) / (du**2).sum(axis=-1)
    return slope, v.mean(axis=-1) - slope * u.mean(axis=-1)


def _power_law(k: float, exponent: float, k_samples, exponent_samples, n: int, confidence: float) -> PowerLawFit:
    tail = (1 - confidence) / 2 * 100
    k_samples, exponent_samples = np.asarray(k_samples, float), np.asarray(exponent_samples, float)
    interval = lambda s: (float(np.percentile(s, tail)), float(np.percentile(s, 100 - tail)))
    return PowerLawFit(float(k), float(exponent), interval(k_samples), interval(exponent_samples), n, confidence,
                       k_samples, exponent_samples)


def fit_power_law(x, y, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> PowerLawFit:
    """Fit y = k x^exponent by least squares on (log x, log y), the form of DeepSeek LLM's Eq. 1 and Eq. 4.

    Intervals: resample the points with replacement n_boot times (NumPy generator seeded by `seed`), refit each
    resample, and take percentiles; resamples whose x are all equal have no slope and are drawn again. Needs at least
    3 points with at least 2 distinct x, all positive."""
    x, y = _check_points(x, y)
    _positive("n_boot", n_boot, integer=True)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is invalid: a number in (0, 1) is required")
    if len(np.unique(x)) < 2:
        raise ValueError(f"x has a single distinct value ({x[0]:g}): a slope needs at least two")
    u, v = np.log(x), np.log(y)
    slope, intercept = _line(u, v)
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    while sum(len(i) for i in kept) < n_boot:
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        kept.append(idx[np.ptp(u[idx], axis=1) > 0])
    idx = np.concatenate(kept)[:n_boot]
    slopes, intercepts = _line(u[idx], v[idx])
    return _power_law(math.exp(intercept), slope, np.exp(intercepts), slopes, len(x), confidence)


@dataclass(frozen=True)
class Parabola:
    """loss = c0 + c1 u + c2 u^2 in u = ln M, fitted to one IsoFLOP curve; its vertex is the budget's optimum."""

    c0: float
    c1: float
    c2: float
    M_range: tuple[float, float]

    @property
    def M_opt(self) -> float:
        """The model scale at the vertex (nan when the parabola opens downward: no minimum)."""
        return math.exp(-self.c1 / (2 * self.c2)) if self.c2 > 0 else math.nan

    @property
    def loss_min(self) -> float:
        return float(self(self.M_opt)) if self.c2 > 0 else math.nan

    @property
    def interior(self) -> bool:
        """True when there is a minimum and it lies strictly inside the sizes that were run."""
        return self.c2 > 0 and self.M_range[0] < self.M_opt < self.M_range[1]

    def __call__(self, M):
        u = np.log(_positive_array("M", M))
        return self.c0 + self.c1 * u + self.c2 * u**2


def parabola_minimum(M, loss) -> Parabola:
    """Fit a parabola in log M to one budget's (M, loss) points by least squares (as Chinchilla's and DeepSeek LLM's
    IsoFLOP analyses do) and return it; .M_opt is the vertex. Needs at least 3 points with 3 distinct M."""
    M, loss = _check_points(M, loss, names=("M", "loss"))
    if len(np.unique(M)) < 3:
        raise ValueError(f"M has {len(np.unique(M))} distinct values: a parabola needs at least 3")
    c2, c1, c0 = np.polyfit(np.log(M), loss, 2)
    return Parabola(float(c0), float(c1), float(c2), (float(M.min()), float(M.max())))


@dataclass(frozen=True)
class IsoFLOPFit:
    """The compute-optimal allocation from IsoFLOP curves (DeepSeek LLM, Eq. 4): M_opt = k C^a and D_opt = k' C^b.

    budgets, curves: each budget and its parabola. Since D = C / M on every curve, D_opt = C / M_opt and so b = 1 - a,
    k' = 1 / k exactly, in the fit and in every bootstrap resample. `usable`: the share of bootstrap resamples in
    which every curve still had a minimum."""

    budgets: tuple[float, ...]
    curves: tuple[Parabola, ...]
    M_opt: PowerLawFit
    D_opt: PowerLawFit
    usable: float

    @property
    def optima(self) -> list[dict]:
        """Per budget: C, M_opt, D_opt = C / M_opt, the loss at the vertex, and whether the vertex is interior."""
        return [{"C": C, "M_opt": p.M_opt, "D_opt": C / p.M_opt, "loss_min": p.loss_min, "interior": p.interior}
                for C, p in zip(self.budgets, self.curves)]


def fit_isoflop(budget, M, loss, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> IsoFLOPFit:
    """Locate each budget's optimum with parabola_minimum, then fit M_opt = k C^a and D_opt = k' C^b to the optima
    by least squares in log-log space (DeepSeek LLM, section 3.2; Chinchilla's "approach 2").

    budget, M, loss: one entry per run (repeated sizes, e.g. several seeds, are fine). Intervals: a residual bootstrap.
    Each resample adds to every fitted parabola residuals drawn with replacement (seeded NumPy generator) from all the
    curves' residuals (scaled by sqrt(n / (n - 3G)): n points, three coefficients for each of the G parabolas), refits
    the parabolas, locates their vertices and refits the power law. Resampling the residuals rather than the points
    keeps every curve's sizes: with five or six points a curve, resampled points often leave three, through which a
    parabola passes exactly.
    Resamples in which a curve has no minimum are drawn again; `usable` is the share kept. Needs at least 3 budgets,
    each with at least 3 distinct sizes."""
    budget, M = _check_points(budget, M, names=("budget", "M"))
    budget, loss = _check_points(budget, loss, names=("budget", "loss"))
    _positive("n_boot", n_boot, integer=True)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is invalid: a number in (0, 1) is required")
    budgets = tuple(float(c) for c in np.unique(budget))
    if len(budgets) < 3:
        raise ValueError(f"too few budgets to fit: {len(budgets)} given, at least 3 needed")
    groups = [np.flatnonzero(budget == c) for c in budgets]
    curves = tuple(parabola_minimum(M[g], loss[g]) for g in groups)
    missing = [f"{c:.3g}" for c, p in zip(budgets, curves) if not p.c2 > 0]
    if missing:
        raise ValueError(f"the IsoFLOP curves of budgets {', '.join(missing)} have no minimum (they curve downward): "
                         f"widen their size range")
    log_C, u = np.log(budgets), np.log(M)
    a, log_k = _line(log_C, np.log([p.M_opt for p in curves]))
    fitted = np.empty_like(loss)
    for g, p in zip(groups, curves):
        fitted[g] = p(M[g])
    residuals = (loss - fitted) * math.sqrt(len(loss) / max(1, len(loss) - 3 * len(groups)))
    rng = np.random.default_rng(seed)
    a_samples, log_k_samples, drawn = [], [], 0
    while len(a_samples) < n_boot and drawn < 20 * n_boot:
        drawn += 1
        noisy = fitted + rng.choice(residuals, size=len(loss))
        vertices = []
        for g in groups:
            c2, c1, _ = np.polyfit(u[g], noisy[g], 2)
            if not c2 > 0:
                break
            vertices.append(-c1 / (2 * c2))
        else:
            slope, intercept = _line(log_C, np.array(vertices))
            a_samples.append(slope)
            log_k_samples.append(intercept)
    if len(a_samples) < n_boot // 2:
        raise ValueError(f"only {len(a_samples)} of {drawn} bootstrap resamples had a minimum on every curve: the "
                         f"curves are too noisy or too flat to place their optima; add sizes or widen their range")
    a_samples, k_samples = np.array(a_samples), np.exp(log_k_samples)
    M_fit = _power_law(math.exp(log_k), a, k_samples, a_samples, len(budgets), confidence)
    D_fit = _power_law(math.exp(-log_k), 1 - a, 1 / k_samples, 1 - a_samples, len(budgets), confidence)
    return IsoFLOPFit(budgets, curves, M_fit, D_fit, len(a_samples) / drawn)


def near_optimal(records: Sequence[Mapping], tolerance: float, loss: str = "loss_bits",
                 group: str = "budget") -> list[Mapping]:
    """The records within `tolerance` (relative) of the lowest loss of their group (by default, their budget): the
    points DeepSeek LLM fits its hyperparameter laws to (it keeps those within 0.25% of the minimum, section 3.1)."""
    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid: a non-negative number is required")
    if not records:
        raise ValueError("no records given")
    best: dict = {}
    for r in records:
        best[r[group]] = min(best.get(r[group], math.inf), r[loss])
    return [r for r in records if r[loss] <= best[r[group]] * (1 + tolerance)]
