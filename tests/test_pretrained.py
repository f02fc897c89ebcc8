"""Unit tests of dslib.pretrained with a tiny recipe: the cache folder, a deterministic build, loading instead of
training, a recipe change that never loads a stale model, and a corrupt entry that is rebuilt with a warning."""

from __future__ import annotations

import pytest
import torch

from dslib.pretrained import (BASE_RECIPE, STEPS_RECIPE, BaseRecipe, R1ZeroRecipe, base_model, base_model_info,
                              base_model_path, base_world, cache_dir, r1zero_model, r1zero_model_info,
                              r1zero_model_path, recipe_key)

TINY = BaseRecipe(world={"n_docs": 300}, d_model=16, n_layer=1, n_head=2, seq_len=96, batch_size=4, steps=6,
                  warmup_steps=2)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSLIB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "cache"
    torch.set_num_threads(threads)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_cache_dir_from_env(tmp_cache, monkeypatch):
    assert cache_dir() == tmp_cache
    monkeypatch.delenv("DSLIB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert str(cache_dir()) == "/somewhere/dslib"


def test_build_then_load(tmp_cache):
    path = base_model_path(0, TINY)
    assert path.parent == tmp_cache and not path.exists()
    a = base_model(0, progress=False, recipe=TINY)
    assert path.is_dir() and {"model.safetensors", "config.json", "recipe.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in tmp_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    info = base_model_info(0, TINY)
    assert info["recipe"]["seed"] == 0 and info["heldout_loss"] > 0
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    b = base_model(0, progress=False, recipe=TINY)
    assert same(a, b) and (path / "model.safetensors").stat().st_mtime_ns == mtime  # loaded, not retrained
    assert not b.training and b.config.d_model == 16
    c = base_model(0, progress=False, rebuild=True, recipe=TINY)
    assert same(a, c)  # deterministic: a rebuild gives the same weights


def test_recipe_and_seed_change_the_key():
    keys = {recipe_key(0, TINY), recipe_key(1, TINY), recipe_key(0, BaseRecipe(**{**TINY.__dict__, "lr": 1e-3})),
            recipe_key(0, BaseRecipe(**{**TINY.__dict__, "world": {"n_docs": 301}})), recipe_key(0, BASE_RECIPE)}
    assert len(keys) == 5
    assert recipe_key(0, TINY) == recipe_key(0, BaseRecipe(**TINY.__dict__))


def test_stale_recipe_is_never_loaded(tmp_cache):
    base_model(0, progress=False, recipe=TINY)
    other = BaseRecipe(**{**TINY.__dict__, "steps": 7})
    base_model(0, progress=False, recipe=other)
    assert base_model_path(0, TINY) != base_model_path(0, other)
    assert base_model_info(0, other)["recipe"]["train"]["steps"] == 7


@pytest.mark.parametrize("damage", ["truncate", "delete", "recipe"])
def test_corrupt_entry_is_rebuilt_with_a_warning(damage):
    a = base_model(0, progress=False, recipe=TINY)
    path = base_model_path(0, TINY)
    if damage == "truncate":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete":
        (path / "config.json").unlink()
    else:
        (path / "recipe.json").write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        b = base_model(0, progress=False, recipe=TINY)
    assert same(a, b)
    base_model(0, progress=False, recipe=TINY)  # healthy again: loads without a warning


def test_validation():
    with pytest.raises(ValueError, match="d_model"):
        BaseRecipe(d_model=0)
    with pytest.raises(ValueError, match="n_docs"):
        BaseRecipe(world={"n_docs": -1})
    with pytest.raises(ValueError, match="seed"):
        base_model(-1, recipe=TINY)
    assert base_world(TINY).config.n_docs == 300


TINY_R1ZERO = R1ZeroRecipe(base=TINY, grpo={"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8})


def test_r1zero_model_builds_deterministically_then_loads(tmp_cache):
    a = r1zero_model(0, progress=False, recipe=TINY_R1ZERO)
    path = r1zero_model_path(0, TINY_R1ZERO)
    assert path.is_dir() and base_model_path(0, TINY).is_dir()  # its base model was built (and cached) first
    info = r1zero_model_info(0, TINY_R1ZERO)
    assert info["recipe"]["kind"] == "r1zero" and info["recipe"]["grpo"]["steps"] == 2
    assert 0 <= info["train_accuracy_last10"] <= 1 and info["build_seconds"] >= 0  # what the GRPO run recorded
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    b = r1zero_model(0, progress=False, recipe=TINY_R1ZERO)
    assert same(a, b) and (path / "model.safetensors").stat().st_mtime_ns == mtime  # loaded, not retrained
    c = r1zero_model(0, progress=False, rebuild=True, recipe=TINY_R1ZERO)
    assert same(a, c)  # deterministic
    (path / "recipe.json").write_text("{}")
    with pytest.warns(UserWarning, match="rebuilding"):
        d = r1zero_model(0, progress=False, recipe=TINY_R1ZERO)
    assert same(a, d)


def test_r1zero_recipe_keys_and_validation():
    other = R1ZeroRecipe(base=TINY, grpo={**TINY_R1ZERO.grpo, "lr": 1e-4})
    assert r1zero_model_path(0, TINY_R1ZERO) != r1zero_model_path(0, other) != r1zero_model_path(1, other)
    with pytest.raises(ValueError, match="seed"):
        R1ZeroRecipe(grpo={"seed": 3})
    with pytest.raises(ValueError, match="group_size"):
        R1ZeroRecipe(grpo={"group_size": 1})
    # The contrast corpus of chapter 06 is another recipe, with the same held-out problems.
    assert recipe_key(0, STEPS_RECIPE) != recipe_key(0, BASE_RECIPE)
    assert [p.text for p in base_world(STEPS_RECIPE).heldout] == [p.text for p in base_world().heldout]


def test_r1_study_builds_every_variant_then_loads(tmp_cache):
    from dslib.pretrained import R1Recipe, r1_model, r1_model_info, r1_model_path, r1_runs_path
    from dslib.r1 import SKIPPABLE, run_r1

    recipe = R1Recipe(base=BaseRecipe(**{**TINY.__dict__, "world": {"n_docs": 300, "prompt_en_rate": 0.5},
                                         "seq_len": 128}),
                      r1={"cold_start_examples": 8, "cold_start_steps": 2, "sft_batch": 2,
                          "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
                          "rejection_problems": 4, "rejection_k": 2, "non_reasoning": 8, "sft_steps": 2,
                          "final_rl": {"steps": 1}})
    final = r1_model(0, progress=False, recipe=recipe)
    info = r1_model_info(0, recipe)
    assert set(info["variant_seconds"]) == {"R1", "R1-Zero", *(f"without {s}" for s in SKIPPABLE)}
    assert info["recipe"]["kind"] == "r1" and info["rejection"]["problems"] == 4
    runs = r1_runs_path(0, recipe)
    assert (runs / "reasoning_rl-nolang").is_dir() and (runs / "cold_start" / "reasoning_rl-nolang").is_dir()
    base = base_model(0, progress=False, recipe=recipe.base)
    stamp = {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")}
    out = run_r1(base, base_world(recipe.base), recipe.config(0), runs, progress=False)
    assert same(out["final"], final)  # the cached final model is the study's R1
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.safetensors")} == stamp  # loaded, nothing trained
    assert same(r1_model(0, progress=False, recipe=recipe), final)
    assert r1_model_path(0, recipe) != r1_model_path(1, recipe)
    with pytest.raises(ValueError, match="seed"):
        R1Recipe(r1={"seed": 1})


def test_r1_recipe_variants_and_student_recipes():
    from dslib.pretrained import R1_RECIPE, STUDENT_RECIPES, STUDENT_RL_RECIPES, R1Recipe, r1_model_path

    with pytest.raises(ValueError, match="variants"):
        R1Recipe(variants=("no such variant",))
    with pytest.raises(ValueError, match="variants"):
        R1Recipe(variants=())
    only = R1Recipe(variants=("R1-Zero",))
    assert list(only.variant_skips()) == ["R1-Zero"] and len(R1_RECIPE.variant_skips()) == 6
    assert r1_model_path(0, only) != r1_model_path(0, R1_RECIPE)
    # The students are smaller than the teacher's base and of another shape (fewer KV heads).
    vocab = base_world(BASE_RECIPE).tokenizer.vocab_size
    for size, recipe in STUDENT_RECIPES.items():
        cfg = recipe.model_config(vocab)
        assert cfg.n_kv_head < cfg.n_head and cfg.d_model < R1_RECIPE.base.d_model
        assert STUDENT_RL_RECIPES[size].base == recipe and recipe.world == R1_RECIPE.base.world


# build_all's scheduler, on tables of stand-in jobs (module-level, so that the spawned workers find them): each job
# records when it ran in a file of the cache folder, so the test can see the order and the overlap.
def _stand_in(seed: int, name: str, seconds: float, meet: str | None = None):
    def job(progress: bool, rebuild: bool) -> str:
        import os
        import time

        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        (folder / f"started-{seed}-{name}").touch()
        met = meet is None
        while not met and time.time() - t0 < 60:  # wait for the job `meet` to start beside this one
            met = (folder / f"started-{seed}-{meet}").exists()
            time.sleep(0.05)
        time.sleep(seconds)
        (folder / f"{seed}-{name}").write_text(f"{t0} {time.time()} {os.getpid()} {int(met)}")
        return f"{name} done"
    return job


def _table(seed: int):
    return {"a": ((), _stand_in(seed, "a", 0.2)), "a2": (("a",), _stand_in(seed, "a2", 0.2)),
            "b": ((), _stand_in(seed, "b", 0.2))}


def _meeting_table(seed: int):  # a and b wait for each other: only workers side by side finish them at once
    return {"a": ((), _stand_in(seed, "a", 0.2, meet="b")), "a2": (("a",), _stand_in(seed, "a2", 0.2)),
            "b": ((), _stand_in(seed, "b", 0.2, meet="a"))}


def _bad_table(seed: int):
    return {"a": (("missing",), _stand_in(seed, "a", 0.0))}


def _cycle_table(seed: int):
    return {"a": (("b",), _stand_in(seed, "a", 0.0)), "b": (("a",), _stand_in(seed, "b", 0.0))}


def _late_table(seed: int):  # a2 is listed before the job it starts from
    return {"a2": (("a",), _stand_in(seed, "a2", 0.0)), "a": ((), _stand_in(seed, "a", 0.0))}


@pytest.mark.parametrize("workers", [1, 2])
def test_build_all_runs_each_job_after_the_ones_it_starts_from(tmp_cache, workers):
    from dslib.pretrained import build_all

    lines = build_all((0, 1), workers=workers, table=_table if workers == 1 else _meeting_table)
    assert sorted(lines) == sorted(f"seed {s} {n} done" for s in (0, 1) for n in ("a", "a2", "b"))
    runs = {f.name: [float(x) for x in f.read_text().split()] for f in tmp_cache.glob("[01]-*")}
    assert len(runs) == 6
    for seed in (0, 1):
        assert runs[f"{seed}-a2"][0] >= runs[f"{seed}-a"][1]  # a2 starts from a: it waits for it
    if workers == 1:  # one process, so the jobs never overlap
        spans = sorted(r[:2] for r in runs.values())
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))
        assert len({r[2] for r in runs.values()}) == 1
    else:  # two worker processes, and a and b of each seed ran side by side (each saw the other start)
        assert len({r[2] for r in runs.values()}) == 2
        assert all(runs[f"{s}-{n}"][3] == 1 for s in (0, 1) for n in ("a", "b"))


def test_build_all_validation(tmp_cache):
    from dslib.pretrained import _jobs, build_all

    with pytest.raises(ValueError, match="workers"):
        build_all((0,), workers=0, table=_table)
    with pytest.raises(ValueError, match="missing"):
        build_all((0,), table=_bad_table)
    with pytest.raises(ValueError, match="seed"):
        build_all((-1,), table=_table)
    with pytest.raises(ValueError, match="wait on each other"):
        build_all((0,), table=_cycle_table)
    assert build_all((0,), table=_late_table) == ["seed 0 a done", "seed 0 a2 done"]
    # The course's table: every entry the chapters load, and each one's prerequisites in it.
    table = _jobs(0)
    assert {"base model", "steps-mix base model", "R1-Zero model", "bilingual base model", "R1 study", "student S",
            "student S RL-only", "student M", "student M RL-only"} == set(table)
    assert table["R1 study"][0] == ("bilingual base model",) and table["R1-Zero model"][0] == ("base model",)
