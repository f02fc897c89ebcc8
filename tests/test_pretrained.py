"""Unit tests of dslib.pretrained with a tiny recipe: the cache folder, a deterministic build, loading instead of
training, a recipe change that never loads a stale model, and a corrupt entry that is rebuilt with a warning."""

from __future__ import annotations

import pytest
import torch

from dslib.pretrained import (BASE_RECIPE, BaseRecipe, base_model, base_model_info, base_model_path, base_world,
                              cache_dir, recipe_key)

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
    a = base_model(0, progress=False, _recipe=TINY)
    assert path.is_dir() and {"model.safetensors", "config.json", "recipe.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in tmp_cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    info = base_model_info(0, TINY)
    assert info["recipe"]["seed"] == 0 and info["heldout_loss"] > 0
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    b = base_model(0, progress=False, _recipe=TINY)
    assert same(a, b) and (path / "model.safetensors").stat().st_mtime_ns == mtime  # loaded, not retrained
    assert not b.training and b.config.d_model == 16
    c = base_model(0, progress=False, rebuild=True, _recipe=TINY)
    assert same(a, c)  # deterministic: a rebuild gives the same weights


def test_recipe_and_seed_change_the_key():
    keys = {recipe_key(0, TINY), recipe_key(1, TINY), recipe_key(0, BaseRecipe(**{**TINY.__dict__, "lr": 1e-3})),
            recipe_key(0, BaseRecipe(**{**TINY.__dict__, "world": {"n_docs": 301}})), recipe_key(0, BASE_RECIPE)}
    assert len(keys) == 5
    assert recipe_key(0, TINY) == recipe_key(0, BaseRecipe(**TINY.__dict__))


def test_stale_recipe_is_never_loaded(tmp_cache):
    base_model(0, progress=False, _recipe=TINY)
    other = BaseRecipe(**{**TINY.__dict__, "steps": 7})
    base_model(0, progress=False, _recipe=other)
    assert base_model_path(0, TINY) != base_model_path(0, other)
    assert base_model_info(0, other)["recipe"]["train"]["steps"] == 7


@pytest.mark.parametrize("damage", ["truncate", "delete", "recipe"])
def test_corrupt_entry_is_rebuilt_with_a_warning(damage):
    a = base_model(0, progress=False, _recipe=TINY)
    path = base_model_path(0, TINY)
    if damage == "truncate":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "delete":
        (path / "config.json").unlink()
    else:
        (path / "recipe.json").write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        b = base_model(0, progress=False, _recipe=TINY)
    assert same(a, b)
    base_model(0, progress=False, _recipe=TINY)  # healthy again: loads without a warning


def test_validation():
    with pytest.raises(ValueError, match="d_model"):
        BaseRecipe(d_model=0)
    with pytest.raises(ValueError, match="n_docs"):
        BaseRecipe(world={"n_docs": -1})
    with pytest.raises(ValueError, match="seed"):
        base_model(-1, _recipe=TINY)
    assert base_world(TINY).config.n_docs == 300
