"""Unit tests of dslib.scaling: FLOP counting, the shape rule, the hyperparameter law, the sweep and its cache, and the
power-law and IsoFLOP fits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import dslib.scaling as scaling
from dslib.scaling import (DEEPSEEK_HYPERPARAMETERS, HyperparameterLaw, RunSpec, Shape, fit_isoflop, fit_power_law,
                           flops_per_token, near_optimal, parabola_minimum, plan_isoflop, plan_run, shape_for,
                           shape_ladder, six_n1, six_n2, size_window, sweep)

# ---------------------------------------------------------------------------------------------------------------------
# FLOPs per token


def test_flops_per_token_deepseek_7b_by_hand():
    # DeepSeek LLM 7B: 30 layers, width 4096, sequence 4096.
    by_hand = 72 * 30 * 4096**2 + 12 * 30 * 4096 * 4096
    assert by_hand == 42_278_584_320
    assert flops_per_token(30, 4096, 4096) == by_hand


def test_flops_per_token_small_by_hand():
    assert flops_per_token(1, 16, 96) == 72 * 256 + 12 * 16 * 96 == 36_864
    assert flops_per_token(2, 48, 96) == 72 * 2 * 48 * 48 + 12 * 2 * 48 * 96


def test_six_n1_and_six_n2():
    assert six_n1(30, 4096) == 72 * 30 * 4096**2
    assert six_n2(30, 4096, 102400) == 72 * 30 * 4096**2 + 6 * 102400 * 4096
    # 67B: 95 layers, width 8192; M exceeds 6N1 by the attention term only.
    assert flops_per_token(95, 8192, 4096) - six_n1(95, 8192) == 12 * 95 * 8192 * 4096


def test_six_n_gap_grows_as_models_shrink():
    # Table 3's point: 6N1 undercounts M most for small models (attention is a larger share of the work).
    ratios = [six_n1(n, d) / flops_per_token(n, d, 4096) for n, d in ((8, 512), (24, 2048), (95, 8192))]
    assert ratios == sorted(ratios) and ratios[0] < 0.5 and 0.9 < ratios[-1] < 1


@pytest.mark.parametrize("args, name", [((0, 16, 96), "n_layer"), ((1, -16, 96), "d_model"), ((1, 16, 0), "seq_len"),
                                        ((1.5, 16, 96), "n_layer"), ((True, 16, 96), "n_layer")])
def test_flops_per_token_rejects_bad_sizes(args, name):
    with pytest.raises(ValueError, match=name):
        flops_per_token(*args)


def test_six_n2_rejects_bad_vocab():
    with pytest.raises(ValueError, match="n_vocab"):
        six_n2(1, 16, 0)


# ---------------------------------------------------------------------------------------------------------------------
# The shape rule


def nearest_depth(d_model, ratio):
    return max(1, math.floor(d_model / ratio + 0.5))


@pytest.mark.parametrize("target", [7e3, 2e4, 5e4, 1.3e5, 4e5, 1e6, 3e6])
@pytest.mark.parametrize("ratio, n_head", [(32.0, 2), (12.0, 4)])
def test_shape_for_hits_the_target_and_keeps_the_aspect_ratio(target, ratio, n_head):
    shape = shape_for(target, 96, aspect_ratio=ratio, n_head=n_head)
    assert shape.M == flops_per_token(shape.n_layer, shape.d_model, shape.seq_len)
    assert shape.n_head == n_head and shape.d_model % (2 * n_head) == 0  # whole heads of an even width
    assert shape.n_layer == nearest_depth(shape.d_model, ratio)  # the depth nearest the aspect ratio
    # Within one step of the grid: no other width (at its nearest depth) is closer to the target, in ratio.
    step = 2 * n_head
    grid = [flops_per_token(nearest_depth(d, ratio), d, 96) for d in range(step, 4096, step)]
    assert abs(math.log(shape.M / target)) == min(abs(math.log(m / target)) for m in grid)
    # ... and the neighbours on the grid bracket the target, so the error is at most one grid step.
    below = max((m for m in grid if m <= target), default=grid[0])
    above = min(m for m in grid if m >= target)
    assert below <= shape.M <= above


def test_shape_for_large_model_is_within_a_few_percent():
    # At DeepSeek 7B's scale the grid is fine: the shape lands within 2% of the target, at the aspect ratio asked.
    target = flops_per_token(30, 4096, 4096)
    shape = shape_for(target, 4096, aspect_ratio=4096 / 30, n_head=32)
    assert abs(shape.M / target - 1) < 0.02
    assert abs(math.log(shape.aspect_ratio / (4096 / 30))) < 0.05


@pytest.mark.parametrize("kwargs, name", [(dict(M=0, seq_len=96), "M"), (dict(M=-1e5, seq_len=96), "M"),
                                          (dict(M=float("nan"), seq_len=96), "M"),
                                          (dict(M=1e5, seq_len=0), "seq_len"),
                                          (dict(M=1e5, seq_len=96, aspect_ratio=0), "aspect_ratio"),
                                          (dict(M=1e5, seq_len=96, aspect_ratio=-3), "aspect_ratio"),
                                          (dict(M=1e5, seq_len=96, n_head=0), "n_head"),
                                          (dict(M=1e5, seq_len=96, n_head=2, multiple=6), "multiple")])
def test_shape_for_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        shape_for(**kwargs)


def test_shape_ladder_and_size_window():
    ladder = shape_ladder(96, 12, n_head=2)
    assert [s.d_model for s in ladder] == list(range(4, 52, 4))
    assert all(s.n_layer == nearest_depth(s.d_model, 32.0) for s in ladder)
    window = size_window(ladder, centre=ladder[5].M, n=5)
    assert window == ladder[3:8]  # centred on the target
    assert size_window(ladder, centre=1.0, n=5) == ladder[:5]  # clamped at the ends
    assert size_window(ladder, centre=1e12, n=5) == ladder[-5:]
    with pytest.raises(ValueError, match="fewer than n"):
        size_window(ladder[:3], centre=1e4, n=5)
    with pytest.raises(ValueError, match="centre"):
        size_window(ladder, centre=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Eq. 1


def test_deepseek_law_reproduces_the_7b_hyperparameters():
    # C for 7B: M by the formula times 2T tokens; the paper's Table 2 has batch 9.4M tokens and lr 4.2e-4.
    C = flops_per_token(30, 4096, 4096) * 2e12
    assert DEEPSEEK_HYPERPARAMETERS.batch_tokens(C) == pytest.approx(9.22e6, rel=0.01)
    assert DEEPSEEK_HYPERPARAMETERS.lr(C) == pytest.approx(4.2e-4, rel=0.02)


def test_law_batch_rows_and_errors():
    law = HyperparameterLaw(lr_k=1.0, lr_exponent=-0.5, batch_k=1.0, batch_exponent=0.5)
    assert law.batch_rows(1e4, 10) == 10 and law.batch_rows(1.0, 10) == 1 and law.lr(100.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="C"):
        law.lr(0.0)
    with pytest.raises(ValueError, match="batch_k"):
        HyperparameterLaw(lr_k=1.0, lr_exponent=0.0, batch_k=-1.0, batch_exponent=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Plans


def test_plan_run_spends_the_budget():
    shape = Shape(1, 16, 2, 96)
    spec = plan_run(3e10, shape, batch_size=8, lr=0.01)
    assert spec.steps == round(3e10 / (shape.M * 8 * 96)) and spec.tokens == spec.steps * 8 * 96
    assert abs(spec.flops / 3e10 - 1) < 0.01 and spec.budget == 3e10 and 0 < spec.warmup_steps < spec.steps


def test_plan_run_refuses_too_few_steps():
    with pytest.raises(ValueError, match="min_steps"):
        plan_run(1e8, Shape(2, 64, 8, 96), batch_size=8, lr=0.01)


@pytest.mark.parametrize("budget", [0.0, -1e10, float("inf")])
def test_plans_reject_bad_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        plan_isoflop([1e10, budget], [1e4, 3e4, 1e5], DEEPSEEK_HYPERPARAMETERS, seq_len=96)


def test_plan_isoflop_one_run_per_distinct_shape():
    specs = plan_isoflop([1e10, 3e10], lambda C: [C**0.5 * f for f in (0.25, 0.5, 1, 2, 4)],
                         DEEPSEEK_HYPERPARAMETERS, seq_len=96)
    for C in (1e10, 3e10):
        mine = [s for s in specs if s.budget == C]
        assert len({(s.n_layer, s.d_model) for s in mine}) == len(mine) >= 4
        assert [s.M for s in mine] == sorted(s.M for s in mine)
        assert all(s.batch_size == DEEPSEEK_HYPERPARAMETERS.batch_rows(C, 96) for s in mine)
        assert all(abs(s.flops / C - 1) < 0.05 for s in mine)


def test_run_spec_validates_itself():
    good = dict(n_layer=1, d_model=16, n_head=2, seq_len=96, batch_size=4, steps=30, lr=0.01, warmup_steps=3)
    RunSpec(**good)
    for bad, name in ((dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(warmup_steps=30), "warmup_steps"),
                      (dict(n_head=3), "n_head"), (dict(schedule="linear"), "schedule"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=name):
            RunSpec(**{**good, **bad})


def test_key_ignores_the_budget_label_and_sees_everything_else():
    base = RunSpec(n_layer=1, d_model=16, n_head=2, seq_len=96, batch_size=4, steps=30, lr=0.01, warmup_steps=3)
    same = RunSpec(**{**base.__dict__, "budget": 1e10})
    assert base.key() == same.key()
    for change in (dict(lr=0.02), dict(steps=31), dict(seed=1), dict(batch_size=8), dict(schedule="cosine"),
                   dict(n_docs=1000), dict(world_seed=1), dict(d_model=24, n_head=3)):
        assert RunSpec(**{**base.__dict__, **change}).key() != base.key(), change


# ---------------------------------------------------------------------------------------------------------------------
# The sweep and its cache


def fake_train(calls):
    def train(spec):
        calls.append(spec)
        return {"loss_bits": 1.0 + 1e-6 * spec.steps + spec.lr, "loss_nats": 0.0, "seconds": 0.0}
    return train


def tiny_specs():
    return [RunSpec(n_layer=1, d_model=d, n_head=d // 8, seq_len=96, batch_size=2, steps=20, lr=lr, warmup_steps=2,
                    n_docs=300, budget=1e9) for d in (8, 16) for lr in (0.01, 0.02)]


def test_sweep_caches_and_does_not_train_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scaling, "train_run", fake_train(calls))
    first = sweep(tiny_specs(), cache=tmp_path, progress=False)
    assert len(calls) == 4 and not any(r["cached"] for r in first)
    assert len(list(tmp_path.glob("*.json"))) == 4
    second = sweep(tiny_specs(), cache=tmp_path, progress=False)
    assert len(calls) == 4 and all(r["cached"] for r in second)
    assert [r["loss_bits"] for r in first] == [r["loss_bits"] for r in second]
    # Different arguments are a different key: only the changed run trains.
    changed = tiny_specs()
    changed[0] = RunSpec(**{**changed[0].__dict__, "lr": 0.03})
    sweep(changed, cache=tmp_path, progress=False)
    assert len(calls) == 5 and calls[-1].lr == 0.03


def test_sweep_runs_duplicates_once_and_ignores_a_corrupt_cache_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scaling, "train_run", fake_train(calls))
    spec = tiny_specs()[0]
    (tmp_path / f"{spec.key()}.json").write_text("{not json")
    records = sweep([spec, spec], cache=tmp_path, progress=False)
    assert len(calls) == 1 and records[0]["loss_bits"] == records[1]["loss_bits"]
    assert json.loads((tmp_path / f"{spec.key()}.json").read_text())["result"]["loss_bits"] == records[0]["loss_bits"]


def test_cache_dir_follows_dslib_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSLIB_CACHE", str(tmp_path))
    assert scaling.cache_dir() == tmp_path / "scaling"


def test_sweep_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="RunSpec"):
        sweep([{"d_model": 16}], cache=tmp_path, progress=False)
    with pytest.raises(ValueError, match="workers"):
        sweep([], cache=tmp_path, workers=0, progress=False)


def test_a_real_tiny_run_is_deterministic_and_cached(tmp_path):
    spec = RunSpec(n_layer=1, d_model=8, n_head=1, seq_len=96, batch_size=2, steps=20, lr=0.01, warmup_steps=2,
                   n_docs=300)
    first = scaling.train_run(spec)
    again = scaling.train_run(spec)
    assert first["loss_bits"] == again["loss_bits"] and math.isfinite(first["loss_bits"])
    assert first["loss_bits"] == pytest.approx(first["loss_nats"] / math.log(2))
    [record] = sweep([spec], cache=tmp_path, progress=False)
    assert record["loss_bits"] == first["loss_bits"] and record["tokens"] == 20 * 2 * 96


# ---------------------------------------------------------------------------------------------------------------------
# Fits


def synthetic_power_law(k, exponent, n=12, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    x = np.logspace(10, 13, n)
    return x, k * x**exponent * np.exp(rng.normal(0.0, noise, n))


@pytest.mark.parametrize("k, exponent", [(0.1715, 0.5243), (5.8316, 0.4757), (0.3118, -0.125)])
def test_fit_power_law_recovers_a_known_law(k, exponent):
    x, y = synthetic_power_law(k, exponent)
    fit = fit_power_law(x, y, n_boot=1000, seed=0)
    lo, hi = fit.exponent_interval
    assert lo < exponent < hi and hi - lo < 0.1
    assert fit.k_interval[0] < k < fit.k_interval[1]
    assert abs(fit.exponent - exponent) < 0.03
    assert fit.predict(1e12) == pytest.approx(fit.k * 1e12**fit.exponent)
    # Exact data: an exact fit.
    exact = fit_power_law(x, k * x**exponent, n_boot=200)
    assert exact.exponent == pytest.approx(exponent, abs=1e-9) and exact.k == pytest.approx(k, rel=1e-6)


def test_fit_power_law_is_deterministic_by_seed():
    x, y = synthetic_power_law(2.0, 0.5)
    a, b, c = fit_power_law(x, y, seed=1), fit_power_law(x, y, seed=1), fit_power_law(x, y, seed=2)
    assert a.exponent_interval == b.exponent_interval and a.k_interval == b.k_interval
    assert a.exponent == c.exponent and a.exponent_interval != c.exponent_interval


@pytest.mark.parametrize("x, y, message", [
    ([1, 2], [1, 2], "too few points"),
    ([1, 2, 3], [1, 2], "mismatched lengths"),
    ([1, 2, 0], [1, 2, 3], "positive"),
    ([1, 2, 3], [1, -2, 3], "positive"),
    ([1, 2, float("nan")], [1, 2, 3], "positive"),
    ([2, 2, 2], [1, 2, 3], "distinct"),
])
def test_fit_power_law_rejects_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_parabola_minimum_finds_the_vertex():
    M = np.logspace(4, 6, 7)
    loss = 1.5 + 0.2 * (np.log(M) - np.log(1e5)) ** 2
    p = parabola_minimum(M, loss)
    assert p.M_opt == pytest.approx(1e5, rel=1e-6) and p.loss_min == pytest.approx(1.5) and p.interior
    # A vertex outside the sizes run is found, but is not interior.
    edge = parabola_minimum(M, 1.5 + 0.2 * (np.log(M) - np.log(1e7)) ** 2)
    assert edge.M_opt == pytest.approx(1e7, rel=1e-6) and not edge.interior
    # A curve that opens downward has no minimum.
    assert math.isnan(parabola_minimum(M, 2.0 - 0.1 * (np.log(M) - 11) ** 2).M_opt)


@pytest.mark.parametrize("M, loss, message", [([1e4, 1e5], [1.0, 2.0], "too few points"),
                                              ([1e4, 1e5, 1e6], [1.0, 2.0], "mismatched lengths"),
                                              ([1e4, 1e4, 1e5], [1.0, 2.0, 3.0], "distinct"),
                                              ([0, 1e5, 1e6], [1.0, 2.0, 3.0], "positive")])
def test_parabola_minimum_rejects_bad_input(M, loss, message):
    with pytest.raises(ValueError, match=message):
        parabola_minimum(M, loss)


def chinchilla_curves(alpha=0.34, beta=0.28, budgets=(1e18, 1e19, 1e20, 1e21), noise=0.0, seed=0):
    """IsoFLOP points of L(M, D) = E + A / M^alpha + B / D^beta, whose optimum is M_opt ~ C^(beta / (alpha + beta))."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        centre = (alpha * 400 / (beta * 400)) ** (1 / (alpha + beta)) * C ** (beta / (alpha + beta))
        for f in np.logspace(-1, 1, 9):
            M = centre * f
            rows.append((C, M, 1.7 + 400 / M**alpha + 400 / (C / M) ** beta + rng.normal(0, noise)))
    return np.array(rows).T


@pytest.mark.parametrize("alpha, beta", [(0.34, 0.28), (0.28, 0.34), (0.3, 0.3)])
def test_fit_isoflop_recovers_the_chinchilla_exponent(alpha, beta):
    a_true = beta / (alpha + beta)
    C, M, loss = chinchilla_curves(alpha, beta, noise=0.002)
    fit = fit_isoflop(C, M, loss, n_boot=300, seed=0)
    assert all(o["interior"] for o in fit.optima)
    lo, hi = fit.M_opt.exponent_interval
    assert lo < a_true < hi and abs(fit.M_opt.exponent - a_true) < 0.03
    assert fit.D_opt.exponent == pytest.approx(1 - fit.M_opt.exponent)  # b = 1 - a since D = C / M
    assert fit.D_opt.k == pytest.approx(1 / fit.M_opt.k)
    assert fit.D_opt.exponent_interval == pytest.approx((1 - hi, 1 - lo))
    again = fit_isoflop(C, M, loss, n_boot=300, seed=0)
    assert again.M_opt.exponent_interval == fit.M_opt.exponent_interval


def test_fit_isoflop_rejects_bad_input():
    C, M, loss = chinchilla_curves()
    keep = C < 1e20  # two budgets only
    with pytest.raises(ValueError, match="too few budgets"):
        fit_isoflop(C[keep], M[keep], loss[keep])
    with pytest.raises(ValueError, match="mismatched lengths"):
        fit_isoflop(C, M[:-1], loss)
    with pytest.raises(ValueError, match="no minimum"):
        fit_isoflop(C, M, 10 - loss)
    with pytest.raises(ValueError, match="positive"):
        fit_isoflop(C, -M, loss)
    with pytest.raises(ValueError, match="positive"):
        fit_isoflop(C, M, np.where(np.arange(len(loss)) == 3, np.inf, loss))  # a diverged run


def test_fit_isoflop_interval_widens_with_noise():
    C, M, loss = chinchilla_curves(noise=0.0005, seed=1)
    quiet = fit_isoflop(C, M, loss, n_boot=300).M_opt.exponent_interval
    C, M, loss = chinchilla_curves(noise=0.01, seed=1)
    noisy = fit_isoflop(C, M, loss, n_boot=300).M_opt.exponent_interval
    assert noisy[1] - noisy[0] > 3 * (quiet[1] - quiet[0])


def test_near_optimal_keeps_points_within_tolerance_of_their_budget():
    records = [{"budget": 1, "loss_bits": x} for x in (1.00, 1.004, 1.02)] + [{"budget": 2, "loss_bits": 2.0}]
    assert [r["loss_bits"] for r in near_optimal(records, 0.005)] == [1.00, 1.004, 2.0]
    with pytest.raises(ValueError, match="tolerance"):
        near_optimal(records, -0.1)


def test_workers_give_the_same_results_as_one_process(tmp_path):
    specs = [RunSpec(n_layer=1, d_model=8, n_head=2, seq_len=96, batch_size=2, steps=20, lr=lr, warmup_steps=2,
                     n_docs=300) for lr in (0.01, 0.03)]
    parallel = sweep(specs, cache=tmp_path / "parallel", workers=2, progress=False)
    scaling.shutdown_workers()
    serial = sweep(specs, cache=tmp_path / "serial", workers=1, progress=False)
    assert [r["loss_bits"] for r in parallel] == [r["loss_bits"] for r in serial]


def test_a_diverged_run_is_recorded_not_raised(tmp_path, monkeypatch):
    from dslib.train import NonFiniteLossError, Trainer

    def explode(self, *args, **kwargs):
        raise NonFiniteLossError("loss is nan")

    monkeypatch.setattr(Trainer, "fit", explode)
    spec = RunSpec(n_layer=1, d_model=8, n_head=2, seq_len=96, batch_size=2, steps=20, lr=10.0, warmup_steps=2,
                   n_docs=300)
    [record] = sweep([spec], cache=tmp_path, progress=False)
    assert record["diverged"] and record["loss_bits"] == math.inf
    [again] = sweep([spec], cache=tmp_path, progress=False)  # infinity survives the JSON cache
    assert again["cached"] and again["loss_bits"] == math.inf and again["diverged"]


def test_band_brackets_the_fit():
    x, y = synthetic_power_law(2.0, 0.5)
    fit = fit_power_law(x, y, n_boot=500)
    lo, hi = fit.band([1e10, 1e12, 1e15])
    mid = fit.predict(np.array([1e10, 1e12, 1e15]))
    assert np.all(lo < mid) and np.all(mid < hi) and (hi / lo)[-1] > (hi / lo)[1]  # wider far from the data
