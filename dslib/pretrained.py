"""Cached base models: hand-written plumbing (no chapter teaches it; chapter 00 teaches the recipe).

Several chapters start from the same pretrained model. `base_model()` builds it the way `from_pretrained` would fetch
it, without a hub: the first call trains it deterministically from the recipe and stores it in a local cache; later
calls load it in a second.

- The cache folder is `DSLIB_CACHE` when set, else `$XDG_CACHE_HOME/dslib`, else `~/.cache/dslib`.
- Each entry is a folder named after the recipe's hash (world config, model config, training config, packing and seed),
  so a changed recipe never loads a stale model. It holds `model.safetensors` and `config.json` (dslib.checkpoint:
  tensors and JSON only, never a pickle) and `recipe.json` (the recipe, the held-out loss and the build time).
- An entry is built in a temporary folder and renamed into place when complete, so an interrupted build leaves nothing
  under the real name, and two processes building at once do not mix their files.
- A corrupt or incomplete entry (a truncated file, a missing file, a recipe that does not match its name) is **rebuilt**,
  with a warning that names the folder; `rebuild=True` forces a rebuild.

These entries are cached this way: the base model (`base_model`, chapter 00's recipe), a second base model pretrained
on a corpus where plain step-by-step solutions are common (`base_model(recipe=STEPS_RECIPE)`, chapter 06's contrast),
the R1-Zero model (`r1zero_model`: GRPO from the base model with chapter 06's recipe), the bilingual base model of
chapter 07 (`base_model(recipe=BILINGUAL_RECIPE)`: problems stated in symbols or in words) and chapter 07's R1 study
(`r1_model`: R1's four stages, R1-Zero and one-stage-out ablations from the bilingual base; the entry keeps every
stage's checkpoints, and its model is the final R1 for chapters 08 and 09). Chapter 08 adds two students
(`base_model(recipe=STUDENT_RECIPES[size])`, smaller GQA models on the bilingual corpus) and their RL-only runs
(`r1_model(recipe=STUDENT_RL_RECIPES[size])`: R1-Zero from the student's base, checkpoints kept).
`python -m dslib.pretrained` builds them all (seed 0; two at a time in two processes on a machine with two cores or
more) and prints where they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dslib.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, read_config, save_checkpoint
from dslib.train import TrainConfig, Trainer
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import PackedData, World, WorldConfig

__all__ = ["BaseRecipe", "BASE_RECIPE", "STEPS_MIX", "STEPS_RECIPE", "BILINGUAL_WORLD", "BILINGUAL_RECIPE", "STUDENT_RECIPES", "R1ZeroRecipe", "R1ZERO_RECIPE", "cache_dir",
           "base_world", "base_model", "base_model_path", "base_model_info", "recipe_key", "r1zero_model",
           "r1zero_model_path", "r1zero_model_info", "R1Recipe", "R1_RECIPE", "STUDENT_RL_RECIPES", "r1_model", "r1_model_path",
           "r1_runs_path", "r1_model_info", "build_all"]

FORMAT_VERSION = 1  # bump when the stored layout or the training code changes what a recipe produces


@dataclass(frozen=True)
class BaseRecipe:
    """How the shared base model is pretrained (the course's pre-study, recommended recipe: shared WORLD.md notes).

    A DeepSeek LLM-style decoder of width 96, 4 layers, 4 heads, context 96 (0.46M parameters), trained on the
    arithmetic world's corpus packed into rows of 96 tokens (attention kept inside each document, loss on the response
    tokens only), AdamW at 3e-3 with warm-up and cosine decay: 2,400 steps x 20 rows, about 4M tokens.
    """

    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig overrides (empty: the default world)
    d_model: int = 96
    n_layer: int = 4
    n_head: int = 4
    seq_len: int = 96
    n_kv_head: int | None = None  # None: as many KV heads as query heads (MHA); fewer: GQA (chapter 08's students)
    batch_size: int = 20
    steps: int = 2400
    lr: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "seq_len", "batch_size", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BaseRecipe.{name}={v!r} is invalid: a positive int is required")
        if not isinstance(self.world, dict):
            raise ValueError(f"BaseRecipe.world={self.world!r} is invalid: a dict of WorldConfig overrides is required")
        WorldConfig(**self.world)  # validates the overrides (ValueError naming the field)

    def world_config(self) -> WorldConfig:
        return WorldConfig(**self.world)

    def model_config(self, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(vocab_size=vocab_size, d_model=self.d_model, n_layer=self.n_layer,
                                 n_head=self.n_head, n_kv_head=self.n_kv_head, max_seq_len=self.seq_len)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, warmup_steps=min(self.warmup_steps, self.steps - 1),
                           schedule=self.schedule, eval_every=0, seed=seed)


BASE_RECIPE = BaseRecipe()

# The contrast of chapter 06 (shared WORLD.md notes: "12% guess-verify beside 27% careless plain steps"): plain
# step-by-step solutions are common and the reflective style is rare. Same model, same training, another corpus.
STEPS_MIX = {"bare": 0.56, "steps": 0.27, "guess_verify": 0.12, "slip_fix": 0.02, "slip": 0.03}
STEPS_RECIPE = BaseRecipe(world={"mix": STEPS_MIX})

# The bilingual base of chapter 07 (R1): half the problems are stated in words, and a solution mostly reasons in the
# problem's language (worded problems: 80% words; problems in symbols: 3% words, 3% switching part-way). Worded
# solutions run to 112 tokens, so the context is 128.
BILINGUAL_WORLD = {"prompt_en_rate": 0.5, "en_rate": 0.03, "switch_rate": 0.03}
BILINGUAL_RECIPE = BaseRecipe(world=BILINGUAL_WORLD, seq_len=128)

# Chapter 08's students: smaller dense models of another shape than the teacher (grouped-query attention, as R1's
# students Qwen and Llama differ from DeepSeek-V3), each pretrained on the bilingual corpus with the same recipe.
STUDENT_RECIPES = {
    "S": BaseRecipe(world=BILINGUAL_WORLD, seq_len=128, d_model=48, n_layer=3, n_head=4, n_kv_head=1),
    "M": BaseRecipe(world=BILINGUAL_WORLD, seq_len=128, d_model=64, n_layer=3, n_head=4, n_kv_head=2),
}


def cache_dir() -> Path:
    """Where cached models live: DSLIB_CACHE, else $XDG_CACHE_HOME/dslib, else ~/.cache/dslib."""
    env = os.environ.get("DSLIB_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dslib"


# WorldConfig fields added after the first cached models: they enter a recipe's key only when they differ from their
# defaults, so models cached before the fields existed (whose worlds are unchanged) keep their names.
_LATER_WORLD_FIELDS = {"prompt_en_rate": 0.0, "en_prompt_consistency": 0.8}


def _world_key(world: WorldConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(world).items() if not (k in _LATER_WORLD_FIELDS and v == _LATER_WORLD_FIELDS[k])}


def _full_recipe(recipe: BaseRecipe, seed: int) -> dict[str, Any]:
    world = recipe.world_config()
    vocab = World(world).tokenizer.vocab_size
    return {"format": FORMAT_VERSION, "seed": seed, "world": _world_key(world),
            "model": recipe.model_config(vocab).to_dict(),
            "train": asdict(recipe.train_config(seed)),
            "packing": {"seq_len": recipe.seq_len, "batch_size": recipe.batch_size, "response_after": "<think>"}}


def recipe_key(seed: int = 0, recipe: BaseRecipe = BASE_RECIPE) -> str:
    """A short hash of everything that decides the weights: world, model, training and packing configs and the seed."""
    text = json.dumps(_full_recipe(recipe, seed), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_model_path(seed: int = 0, recipe: BaseRecipe = BASE_RECIPE) -> Path:
    """The cache folder of the base model of `seed` (it may not exist yet)."""
    return cache_dir() / f"base-seed{seed}-{recipe_key(seed, recipe)}"


def base_world(recipe: BaseRecipe = BASE_RECIPE) -> World:
    """The arithmetic world the base model was trained on (tokenizer, held-out problems, grading)."""
    return World(recipe.world_config())


def _train(recipe: BaseRecipe, seed: int, progress: bool, device: torch.device) -> tuple[Transformer, dict]:
    world = base_world(recipe)
    docs = [d.text for d in world.corpus()]
    data = PackedData(docs, world.tokenizer, recipe.seq_len, recipe.batch_size, seed=seed)
    valid = PackedData([d.text for d in world.validation()], world.tokenizer, recipe.seq_len, 64,
                       seed=seed).all_batches()
    torch.manual_seed(seed)
    model = Transformer(recipe.model_config(world.tokenizer.vocab_size))
    trainer = Trainer(model, data, recipe.train_config(seed), eval_batches=valid, device=device)
    t0 = time.time()
    history = trainer.fit(progress=progress)
    seconds = time.time() - t0
    info = {"heldout_loss": history["eval_loss"][-1], "final_train_loss": history["loss"][-1],
            "build_seconds": round(seconds, 1), "parameters": model.num_params(),
            "tokens": recipe.steps * recipe.batch_size * recipe.seq_len}
    return model, info


def _read_recipe(path: Path, want: dict[str, Any]) -> None:
    """CheckpointError unless the entry's recipe.json holds exactly `want`."""
    try:
        stored = json.loads((path / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'recipe.json'}: missing or corrupt ({e})") from None
    if not isinstance(stored, dict) or stored.get("recipe") != json.loads(json.dumps(want, default=list)):
        raise CheckpointError(f"{path}: holds a model of another recipe")


def _load_transformer(path: Path, want: dict[str, Any], device: torch.device) -> Transformer:
    """Load a cached entry; CheckpointError when it is incomplete, corrupt or of another recipe."""
    _read_recipe(path, want)
    config = read_config(path)
    try:
        model = Transformer(TransformerConfig(**config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not a TransformerConfig ({e})") from None
    load_checkpoint(path, model)
    return model.to(device).eval()


def _store(path: Path, model: Transformer, want: dict[str, Any], info: dict[str, Any], step: int,
           tmp: Path) -> None:
    """Write an entry into its temporary folder, then rename it into place (an interrupted build leaves nothing; the
    caller, _cached, removes the temporary folder whatever happens)."""
    tmp.chmod(0o755)
    save_checkpoint(tmp, model, model.config.to_dict(), step=step)
    atomic_write_text(tmp / "recipe.json", json.dumps({"recipe": want, **info}, indent=2, default=list) + "\n")
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process put a complete entry there first: keep it
        pass


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid: a non-negative int is required")


def _cached(path: Path, want: dict[str, Any], what: str, device: torch.device, rebuild: bool, progress: bool,
            build) -> Transformer:
    """Load the entry at path, or build it with build(folder) -> (model, info, step) and store it. `folder` is the
    entry's temporary folder: what build writes there (checkpoints of the stages) is renamed into place with it."""
    if path.exists() and not rebuild:
        try:
            return _load_transformer(path, want, device)
        except CheckpointError as e:
            warnings.warn(f"cached {what} at {path} is unusable ({e}); rebuilding it", stacklevel=3)
    if progress:
        print(f"building the {what} into {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model, info, step = build(tmp)
        _store(path, model, want, info, step, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(device).eval()


def base_model(seed: int = 0, progress: bool = True, device: torch.device | str | None = None, *,
               rebuild: bool = False, recipe: BaseRecipe | None = None) -> Transformer:
    """The pretrained base model of the course (chapters 05 and 06 start from it), built once and then cached.

    seed: the pretraining seed (weight initialisation and the order of the packed rows; the world is fixed).
    progress: show the training progress bar when the model has to be built.
    device: where the returned model lives (default: CPU). A build trains on this device (CPU: float32; CUDA: bf16
        autocast, so a model built on a GPU is not bitwise the CPU's; either is cached under the same recipe).
    rebuild: train again even when the cache holds the model.
    recipe: another recipe (STEPS_RECIPE: chapter 06's contrasting corpus; a tiny one builds in seconds, for tests);
        each is cached under its own hash.

    A corrupt or incomplete cache entry is rebuilt, with a warning naming it. Returns the model in eval mode; get its
    world (tokenizer, problems, grading) with `base_world(recipe)`.
    """
    recipe = recipe or BASE_RECIPE
    _check_seed(seed)
    device = torch.device(device or "cpu")

    def build(_folder):
        model, info = _train(recipe, seed, progress, device)
        return model, info, recipe.steps

    return _cached(base_model_path(seed, recipe), _full_recipe(recipe, seed), f"base model (seed {seed})", device,
                   rebuild, progress, build)


def base_model_info(seed: int = 0, recipe: BaseRecipe = BASE_RECIPE) -> dict[str, Any]:
    """What was recorded when the cached base model was built (held-out loss, build time, ...); {} if not cached."""
    return _info(base_model_path(seed, recipe))


def _info(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


@dataclass(frozen=True)
class R1ZeroRecipe:
    """How the cached R1-Zero model is grown (chapter 06): GRPO from the base model of `base` (same seed), with R1-Zero's
    rule rewards (accuracy 1 + format 0.1) and the GRPO settings `grpo` (GRPOConfig fields; the rest are defaults:
    32 prompts x G = 8, 64 new tokens, Adam 2e-4, clip 0.2, mu = 1, beta 0)."""

    base: BaseRecipe = BASE_RECIPE
    grpo: dict[str, Any] = field(default_factory=lambda: {"steps": 100})

    def __post_init__(self) -> None:
        if not isinstance(self.grpo, dict) or "seed" in self.grpo:
            raise ValueError(f"R1ZeroRecipe.grpo={self.grpo!r} is invalid: a dict of GRPOConfig fields without "
                             f"'seed' (the seed is r1zero_model's)")
        self.grpo_config(0)  # validates the fields (ValueError naming the field)

    def grpo_config(self, seed: int):
        from dslib.grpo import GRPOConfig

        return GRPOConfig(**{"log_kl": False, **self.grpo, "seed": seed})


R1ZERO_RECIPE = R1ZeroRecipe()


def _r1zero_full(recipe: R1ZeroRecipe, seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": "r1zero", "seed": seed, "base": _full_recipe(recipe.base, seed),
            "grpo": asdict(recipe.grpo_config(seed)), "rewards": {"accuracy": 1.0, "format": 0.1}}


def r1zero_model_path(seed: int = 0, recipe: R1ZeroRecipe = R1ZERO_RECIPE) -> Path:
    """The cache folder of the R1-Zero model of `seed` (it may not exist yet)."""
    text = json.dumps(_r1zero_full(recipe, seed), sort_keys=True, default=list)
    return cache_dir() / f"r1zero-seed{seed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def r1zero_model(seed: int = 0, progress: bool = True, device: torch.device | str | None = None, *,
                 rebuild: bool = False, recipe: R1ZeroRecipe | None = None) -> Transformer:
    """The R1-Zero model of chapter 06: GRPO with rule rewards only, from `base_model(seed)`; built once (about 1.5
    minutes on one CPU thread once the base model is cached), then loaded from the cache. Deterministic: the same
    machine and thread count give the same weights. Arguments as for `base_model`."""
    import copy

    from dslib.grpo import GRPOTrainer

    recipe = recipe or R1ZERO_RECIPE
    _check_seed(seed)
    device = torch.device(device or "cpu")

    def build(_folder):
        base = base_model(seed, progress, device, recipe=recipe.base)
        config = recipe.grpo_config(seed)
        trainer = GRPOTrainer(copy.deepcopy(base), base_world(recipe.base), config, ref_model=base)
        t0 = time.time()
        hist = trainer.fit(progress=progress)
        last = slice(-10, None)
        info = {"build_seconds": round(time.time() - t0, 1), "parameters": trainer.model.num_params(),
                "train_accuracy_last10": sum(hist["accuracy"][last]) / len(hist["accuracy"][last]),
                "train_length_last10": sum(hist["length"][last]) / len(hist["length"][last])}
        return trainer.model, info, config.steps

    return _cached(r1zero_model_path(seed, recipe), _r1zero_full(recipe, seed), f"R1-Zero model (seed {seed})",
                   device, rebuild, progress, build)


def r1zero_model_info(seed: int = 0, recipe: R1ZeroRecipe = R1ZERO_RECIPE) -> dict[str, Any]:
    """What was recorded when the cached R1-Zero model was built; {} if not cached."""
    return _info(r1zero_model_path(seed, recipe))


@dataclass(frozen=True)
class R1Recipe:
    """How chapter 07's R1 study is built: the bilingual base model of `base` (same seed), then dslib.r1's pipeline
    (`r1`: R1Config fields; the rest are defaults) run for every variant of R1_VARIANTS into one folder, where the
    variants share the stages they have in common."""

    base: BaseRecipe = BILINGUAL_RECIPE
    r1: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] | None = None  # names from R1_VARIANTS to build (None: all of them)

    def __post_init__(self) -> None:
        known = _r1_variants()
        if self.variants is not None and (not self.variants or any(v not in known for v in self.variants)):
            raise ValueError(f"R1Recipe.variants={self.variants!r} is invalid: None or names from {tuple(known)}")
        if not isinstance(self.r1, dict) or "seed" in self.r1:
            raise ValueError(f"R1Recipe.r1={self.r1!r} is invalid: a dict of R1Config fields without 'seed' (the "
                             f"seed is r1_model's)")
        self.config(0)  # validates the fields (ValueError naming the field)

    def config(self, seed: int):
        from dslib.r1 import R1Config

        return R1Config(**{**self.r1, "seed": seed})

    def variant_skips(self) -> dict[str, tuple[str, ...]]:
        known = _r1_variants()
        return known if self.variants is None else {v: known[v] for v in self.variants}


def _r1_variants() -> dict[str, tuple[str, ...]]:
    from dslib.r1 import SKIPPABLE

    return {"R1": (), "R1-Zero": SKIPPABLE, **{f"without {s}": (s,) for s in SKIPPABLE}}


R1_RECIPE = R1Recipe()
# Chapter 08's RL-only students: R1-Zero (stage 2 of R1 without the consistency reward, from the student's own base),
# with its checkpoints kept so that the chapter can match its compute against distillation's.
STUDENT_RL_RECIPES = {size: R1Recipe(base=recipe, variants=("R1-Zero",)) for size, recipe in STUDENT_RECIPES.items()}


def _r1_full(recipe: R1Recipe, seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": "r1", "seed": seed, "base": _full_recipe(recipe.base, seed),
            "r1": asdict(recipe.config(seed)), "variants": recipe.variant_skips()}


def r1_model_path(seed: int = 0, recipe: R1Recipe = R1_RECIPE) -> Path:
    """The cache folder of the R1 study of `seed` (it may not exist yet)."""
    text = json.dumps(_r1_full(recipe, seed), sort_keys=True, default=list)
    return cache_dir() / f"r1-seed{seed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def r1_model(seed: int = 0, progress: bool = True, device: torch.device | str | None = None, *,
             rebuild: bool = False, recipe: R1Recipe | None = None) -> Transformer:
    """The R1 model of chapter 07 (all four stages from the bilingual base model), for chapters 08 and 09; built once
    with the whole study (every variant of the ablation, about 15 minutes on one CPU thread once the bilingual base is
    cached), then loaded. The study's stage checkpoints are in `r1_runs_path(seed)`: `dslib.r1.run_r1(...,
    checkpoint_dir=r1_runs_path(seed), skip=...)` loads a variant's models from there. Arguments as for base_model."""
    from dslib.r1 import run_r1

    recipe = recipe or R1_RECIPE
    _check_seed(seed)
    device = torch.device(device or "cpu")

    def build(folder: Path):
        base = base_model(seed, progress, device, recipe=recipe.base)
        world, config = base_world(recipe.base), recipe.config(seed)
        info: dict[str, Any] = {"variant_seconds": {}}
        final = None
        for name, skip in recipe.variant_skips().items():
            t0 = time.time()
            out = run_r1(base, world, config, folder / "runs", skip=skip, progress=progress)
            info["variant_seconds"][name] = round(time.time() - t0, 1)
            if name == "R1" or final is None:  # the entry's model: R1 when built, else the first variant's
                final = out["final"]
                if "rejection" in out:
                    info["rejection"] = out["rejection"]
        info["build_seconds"] = round(sum(info["variant_seconds"].values()), 1)
        info["parameters"] = final.num_params()
        return final, info, 0

    return _cached(r1_model_path(seed, recipe), _r1_full(recipe, seed), f"R1 study (seed {seed})", device,
                   rebuild, progress, build)


def r1_runs_path(seed: int = 0, recipe: R1Recipe = R1_RECIPE) -> Path:
    """Where the R1 study's stage checkpoints are (build them with r1_model first)."""
    return r1_model_path(seed, recipe) / "runs"


def r1_model_info(seed: int = 0, recipe: R1Recipe = R1_RECIPE) -> dict[str, Any]:
    """What was recorded when the R1 study was built (seconds per variant, rejection counts); {} if not cached."""
    return _info(r1_model_path(seed, recipe))


def _jobs(seed: int) -> dict[str, tuple[tuple[str, ...], Any]]:
    """The cached entries of `seed` as build jobs: name -> (the jobs it starts from, a function that builds it and
    returns a line saying where it is). Listed longest chain first (the R1 study waits for the bilingual base)."""

    def base(recipe: BaseRecipe, what: str):
        def job(progress: bool, rebuild: bool) -> str:
            base_model(seed, progress=progress, rebuild=rebuild, recipe=recipe)
            info = base_model_info(seed, recipe)
            return (f"{what}: {base_model_path(seed, recipe)} (held-out loss "
                    f"{info.get('heldout_loss', float('nan')):.3f}, built in {info.get('build_seconds', 0):.0f} s)")
        return job

    def r1zero(progress: bool, rebuild: bool) -> str:
        r1zero_model(seed, progress=progress, rebuild=rebuild)
        return (f"R1-Zero model: {r1zero_model_path(seed)} (built in "
                f"{r1zero_model_info(seed).get('build_seconds', 0):.0f} s)")

    def r1(recipe: R1Recipe, what: str):
        def job(progress: bool, rebuild: bool) -> str:
            r1_model(seed, progress=progress, rebuild=rebuild, recipe=recipe)
            info = r1_model_info(seed, recipe)
            return (f"{what}: {r1_model_path(seed, recipe)} (built in {info.get('build_seconds', 0):.0f} s: "
                    f"{info.get('variant_seconds')})")
        return job

    jobs = {"bilingual base model": ((), base(BILINGUAL_RECIPE, "bilingual base model")),
            "R1 study": (("bilingual base model",), r1(R1_RECIPE, "R1 study")),
            "base model": ((), base(BASE_RECIPE, "base model")),
            "R1-Zero model": (("base model",), r1zero),
            "steps-mix base model": ((), base(STEPS_RECIPE, "steps-mix base model"))}
    for size, recipe in STUDENT_RECIPES.items():
        jobs[f"student {size}"] = ((), base(recipe, f"student {size}"))
        jobs[f"student {size} RL-only"] = ((f"student {size}",), r1(STUDENT_RL_RECIPES[size], f"student {size} RL-only"))
    return jobs


def _run_job(table, seed: int, name: str, threads: int, progress: bool, rebuild: bool) -> tuple[str, float]:
    """One job (in a worker process when there are several): (its line, seconds)."""
    import dslib

    dslib.setup(0, threads=threads, quiet=True)
    t0 = time.time()
    line = table(seed)[name][1](progress, rebuild)
    return line, time.time() - t0


def build_all(seeds: tuple[int, ...] = (0,), *, workers: int = 1, threads: int = 1, rebuild: bool = False,
              progress: bool = True, table=None) -> list[str]:
    """Build (or find) every cached entry of each seed; returns a line per entry saying where it is.

    workers > 1 builds independent entries side by side, each in its own process on `threads` threads (the entries
    are trained on one thread each, so two processes on two cores take about half the time of one; the weights are
    the same either way). With several workers the progress bars give way to a line per finished entry.
    table: seed -> {name: (names it starts from, build function)}, a module-level function (default: every entry of
    the course; tests pass a small one)."""
    table = table or _jobs
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid: a positive int is required")
    for seed in seeds:
        _check_seed(seed)
    todo = {(seed, name): deps for seed in seeds for name, (deps, _) in table(seed).items()}
    unknown = sorted({d for (seed, _), deps in todo.items() for d in deps if (seed, d) not in todo})
    if unknown:
        raise ValueError(f"the build table names jobs it does not have: {unknown}")
    order: list[tuple[int, str]] = []  # the table's order, each job moved after the ones it starts from
    while len(order) < len(todo):
        ready = [k for k, deps in todo.items() if k not in order and all((k[0], d) in order for d in deps)]
        if not ready:
            raise ValueError(f"the build table's jobs wait on each other: {sorted(set(todo) - set(order))}")
        order.append(ready[0])
    todo = {k: todo[k] for k in order}
    lines = []
    if workers == 1:
        for seed, name in order:
            line, seconds = _run_job(table, seed, name, threads, progress, rebuild)
            lines.append(f"seed {seed} {line}")
            print(f"{lines[-1]} [{seconds:.0f} s]", flush=True)
        return lines
    import concurrent.futures as cf
    import multiprocessing

    done: set[tuple[int, str]] = set()
    running: dict[cf.Future, tuple[int, str]] = {}
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while todo or running:
            for key in [k for k, deps in todo.items() if all((k[0], d) in done for d in deps)]:
                if len(running) == workers:
                    break
                del todo[key]
                running[pool.submit(_run_job, table, key[0], key[1], threads, False, rebuild)] = key
                print(f"[{time.time() - t0:5.0f} s] seed {key[0]} {key[1]}: started", flush=True)
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                line, seconds = future.result()  # a failed build raises here, naming its error
                done.add(key)
                lines.append(f"seed {key[0]} {line}")
                print(f"[{time.time() - t0:5.0f} s] {lines[-1]} [{seconds:.0f} s]", flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build (or find) every cached dslib model and print where it is.")
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="pretraining seeds of the models")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per build (default 1: the models are tiny, and one thread suffers least on a "
                        "busy machine)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="builds side by side, each in its own process (default: 2 when the machine has 2 cores or "
                        "more; 1 shows progress bars)")
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    build_all(tuple(args.seeds), workers=args.workers, threads=args.threads, rebuild=args.rebuild)
    print(f"all cached models ready in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
