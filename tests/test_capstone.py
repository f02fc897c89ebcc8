"""The capstone command (dslib.capstone): its folder, its errors, resume after a crash or Ctrl-C, the transformers
exports, and a smoke test of the `full` preset on the CPU. The `tiny` preset runs every stage in seconds (nothing is
learnt); the `small` preset's figures are measured by running the command, not here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dslib import capstone
from dslib.capstone import PRESETS, STAGES, CapstoneError, model_names

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("greedy_accuracy", "pass@1", "cons@k", "mean_length", "reflection_rate", "language_mixing",
             "hf_greedy_accuracy")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dslib", "capstone", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _finals(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.parent.relative_to(out)): _weights(p) for p in sorted(out.glob("stages/**/final"))}


def _comparable(metrics: dict) -> dict:
    """metrics.json without what depends on the clock."""
    drop = {"seconds_this_session", "tokens_per_second", "model_tflops", "mfu", "peak_memory_gib", "seconds"}

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean({k: v for k, v in metrics.items() if k not in ("run", "seconds")})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One uninterrupted tiny run, in a subprocess, as a reader would start it."""
    out = tmp_path_factory.mktemp("capstone") / "run"
    r = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--threads", "1", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "report card:" in r.stdout
    for stage in STAGES:
        assert f"[{stage}] done in" in r.stdout, (stage, r.stdout)
    return out


def test_the_folder_holds_everything_the_report_promises(tiny_run: Path):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    names = model_names(PRESETS["tiny"])
    assert names == ["base", "r1_zero", "r1", "student-S-base", "student-S-distill", "student-S-rl"]
    assert sorted(metrics["eval"]) == sorted(names)
    for name in names:
        for key in EVAL_KEYS:
            assert 0 <= metrics["eval"][name][key] <= (1 if key != "mean_length" else 1000), (name, key)
        assert (tiny_run / "hf" / name / "config.json").exists()
    lines = [json.loads(l) for l in (tiny_run / "heldout.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * PRESETS["tiny"].eval_problems == metrics["heldout"]
    assert all(set(l) >= {"prompt", "answer"} and l["prompt"].endswith("<think>") for l in lines)
    assert {l["language"] for l in lines} == {"sym", "en"}
    pre = metrics["stages"]["pretrain"]
    assert pre["steps"] == PRESETS["tiny"].pretrain_steps == len(pre["loss"])
    assert pre["parameters_mtp"] > pre["parameters"]  # the MTP module was built and counted
    for png in ("pretraining.png", "r1_zero.png", "models.png", "timeline.png"):
        assert (tiny_run / png).stat().st_size > 5000, png
    md = (tiny_run / "report.md").read_text()
    assert "| student-S-distill |" in md and "![models.png](models.png)" in md
    # The students stage's time by part, in metrics.json and in the report's time table.
    parts = metrics["stages"]["students"]["sizes"]["S"]["seconds"]
    assert set(parts) == {"base", "distill", "rl"} and all(t > 0 for t in parts.values())
    assert "| student S: base |" in md and "| the teacher's samples |" in md
    page = (tiny_run / "report.html").read_text()
    assert page.count("<table>") == md.count("\n|---") and '<img alt="models.png" src="models.png">' in page


def test_exported_folders_decode_in_transformers_as_dslib_does(tiny_run: Path):
    transformers = pytest.importorskip("transformers")
    from dslib.capstone import _world, heldout_problems, load_model
    from dslib.train import complete
    from dslib.world import prompt

    world = _world(PRESETS["tiny"])
    problems = heldout_problems(PRESETS["tiny"], world)[:4]
    for name, stage in (("r1", "stages/r1/final"), ("student-S-distill", "stages/students/S/distill/final")):
        ours = complete(load_model(tiny_run / stage), world.tokenizer, [prompt(q) for q in problems],
                        max_new_tokens=24)
        folder = tiny_run / "hf" / name
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        for q, mine in zip(problems, ours):
            ids = tok(prompt(q), return_tensors="pt").input_ids
            out = hf.generate(ids, max_new_tokens=24, max_length=None, do_sample=False,
                              eos_token_id=tok.convert_tokens_to_ids("</answer>"), pad_token_id=tok.pad_token_id)
            assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == mine.replace("<eos>", ""), name


def test_two_workers_compute_what_one_worker_does(tiny_run: Path, tmp_path: Path):
    """--workers 2 (the fixture's run) moves the students' own runs and r1_zero into a second process; with the same
    threads per process, every weight and every metric equals a run of one stage after another."""
    out = tmp_path / "one"
    r = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--threads", "1", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "second worker" not in r.stdout and "second worker" in (tiny_run / "report.md").read_text()
    one, two = (json.loads((o / "run.json").read_text()) for o in (out, tiny_run))
    assert (one["sessions"][-1]["workers"], two["sessions"][-1]["workers"]) == (1, 2)
    assert one["threads"] == two["threads"] == 1
    assert _comparable(json.loads((out / "metrics.json").read_text())) == \
        _comparable(json.loads((tiny_run / "metrics.json").read_text()))
    mine, ref = _finals(out), _finals(tiny_run)
    assert sorted(mine) == sorted(ref)
    for stage in ref:
        assert all(torch.equal(mine[stage][k], ref[stage][k]) for k in ref[stage]), stage
    assert set(two["seconds"]) == set(STAGES) and two["wall_seconds"] > 0


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux's /proc; empty elsewhere)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_run_stopped_mid_stage_resumes_to_the_same_result(tiny_run: Path, tmp_path: Path, how: str):
    """Stop a run once the pretraining's first checkpoint exists (a crash: SIGKILL; Ctrl-C: SIGINT), then resume:
    every stage's final weights and every metric equal the uninterrupted run's."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dslib", "capstone", "--preset", "tiny", "--out", str(out),
                             "--quiet", "--threads", "1", "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ckpt = out / "stages" / "pretrain" / "train" / "trainer.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    workers = _children(proc.pid)  # the second worker (and multiprocessing's resource tracker)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGINT":
        assert proc.returncode == 130 and "--resume" in err, err[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    if Path("/proc").is_dir():
        assert workers, "no second worker was running"
        deadline = time.time() + 10  # a killed run takes its second worker with it; a stopped one waits for it
        while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2:3]
                  for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2:3]
                       for w in workers), "the second worker outlived the run"
    assert not (out / "stages" / "pretrain" / "done.json").exists()  # stopped inside the stage
    again = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--threads", "1")
    assert again.returncode == 2 and "--resume" in again.stderr  # refused without --resume
    r = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--threads", "1", "--workers", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrain: resumed at step" in r.stdout
    assert _comparable(json.loads((out / "metrics.json").read_text())) == \
        _comparable(json.loads((tiny_run / "metrics.json").read_text()))
    mine, ref = _finals(out), _finals(tiny_run)
    assert sorted(mine) == sorted(ref) and len(mine) == len(model_names(PRESETS["tiny"]))
    for stage in ref:
        assert all(torch.equal(mine[stage][k], ref[stage][k]) for k in ref[stage]), stage


def test_resume_loads_finished_stages_and_refuses_a_corrupt_checkpoint(tiny_run: Path, tmp_path: Path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    r = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--resume", "--stages", "pretrain,r1_zero")
    assert r.returncode == 0 and "[pretrain] done earlier: loaded" in r.stdout, r.stderr[-2000:]
    # A stage in progress whose checkpoint is torn: a clear error, and the file is left as it was.
    (out / "stages" / "pretrain" / "done.json").unlink()
    record = json.loads((out / "run.json").read_text())
    record["stages_done"].remove("pretrain")
    (out / "run.json").write_text(json.dumps(record))
    bad = out / "stages" / "pretrain" / "train" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    before = bad.read_bytes()
    r = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--resume", "--stages", "pretrain")
    assert r.returncode == 2 and "corrupt" in r.stderr and "nothing was overwritten" in r.stderr, r.stderr[-2000:]
    assert bad.read_bytes() == before


def test_an_evaluation_stopped_between_models_keeps_the_models_it_finished(tiny_run: Path, tmp_path: Path):
    """The evaluation records each model as it finishes (stages/eval/partial.json). Resumed after a stop between
    two models, it takes the finished ones from there, without evaluating them again, and evaluates the rest to the
    same figures as the uninterrupted run."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    eval_dir = out / "stages" / "eval"
    reference = json.loads((eval_dir / "done.json").read_text())
    names = model_names(PRESETS["tiny"])
    assert list(reference) == names
    # as the run left it when stopped after the first two models: their results saved, the stage not done
    finished = names[:2]
    partial = {name: dict(reference[name]) for name in finished}
    for name in finished:  # a mark that only a result read back from partial.json can carry
        partial[name]["parameters"] = -1
    (eval_dir / "partial.json").write_text(json.dumps(partial))
    (eval_dir / "done.json").unlink()
    record = json.loads((out / "run.json").read_text())
    record["stages_done"] = [s for s in record["stages_done"] if s not in ("eval", "report")]
    (out / "run.json").write_text(json.dumps(record))
    for name in names:
        shutil.rmtree(out / "hf" / name)
    r = _cli("--preset", "tiny", "--out", str(out), "--quiet", "--threads", "1", "--resume", "--stages", "eval,report")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[eval] done in" in r.stdout, r.stdout
    resumed = json.loads((eval_dir / "done.json").read_text())
    assert list(resumed) == names
    for name in finished:  # taken from partial.json, not evaluated again (so not exported again either)
        assert resumed[name]["parameters"] == -1
        assert not (out / "hf" / name).exists()
    for name in names[2:]:  # evaluated now, to the uninterrupted run's figures
        assert (out / "hf" / name / "config.json").is_file()
        assert _comparable(resumed[name]) == _comparable(reference[name]), name


def test_bad_options_and_folders_are_refused_before_anything_is_written(tiny_run: Path, tmp_path: Path):
    with pytest.raises(CapstoneError, match="preset 'huge'"):
        capstone.run(tmp_path / "a", "huge")
    with pytest.raises(CapstoneError, match="--stages: polish not among"):
        capstone.run(tmp_path / "a", "tiny", stages=["polish"])
    with pytest.raises(CapstoneError, match="--max-steps 0"):
        capstone.run(tmp_path / "a", "tiny", max_steps=0)
    with pytest.raises(CapstoneError, match="--seed -1"):
        capstone.run(tmp_path / "a", "tiny", seed=-1)
    with pytest.raises(CapstoneError, match="--compile 'turbo' is not a torch.compile backend"):
        capstone.run(tmp_path / "a", "tiny", compile="turbo")
    with pytest.raises(CapstoneError, match="--workers 3 is invalid"):
        capstone.run(tmp_path / "a", "tiny", workers=3)
    with pytest.raises(CapstoneError, match="--threads 0 is invalid"):
        capstone.run(tmp_path / "a", "tiny", threads=0)
    with pytest.raises(CapstoneError, match="needs pretrain first"):
        capstone.run(tmp_path / "b", "tiny", stages=["r1_zero"], progress=False)
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CapstoneError, match="cannot be written|not a folder"):
        capstone.run(blocker / "sub", "tiny")
    with pytest.raises(CapstoneError, match="is not a folder"):
        capstone.run(blocker, "tiny")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(CapstoneError, match="not empty and holds no capstone run"):
        capstone.run(busy, "tiny")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    with pytest.raises(CapstoneError, match="holds no capstone run to resume"):
        capstone.run(tmp_path / "new", "tiny", resume=True)
    stamp = (tiny_run / "run.json").read_text()
    with pytest.raises(CapstoneError, match="holds a capstone run already; pass --resume"):
        capstone.run(tiny_run, "tiny")
    with pytest.raises(CapstoneError, match="holds another run"):
        capstone.run(tiny_run, "tiny", seed=1, resume=True)
    assert (tiny_run / "run.json").read_text() == stamp
    r = _cli("--preset", "enormous")
    assert r.returncode == 2 and "invalid choice: 'enormous'" in r.stderr
    r = _cli("--workers", "4")
    assert r.returncode == 2 and "invalid choice: 4" in r.stderr
    r = _cli("--help")
    assert r.returncode == 0 and all(opt in r.stdout for opt in ("--preset", "--out", "--resume", "--stages",
                                                                  "--device", "--seed", "--max-steps", "--workers"))


def test_the_full_preset_runs_two_steps_of_every_stage_on_the_cpu(tmp_path: Path):
    """The GPU preset's shapes and configs, caught on the CPU before a reader's GPU meets them."""
    metrics = capstone.run(tmp_path / "full", "full", max_steps=2, device="cpu", progress=False,
                           stages=["pretrain", "r1_zero", "r1", "students"])
    pre = metrics["stages"]["pretrain"]
    assert pre["steps"] == 2 and pre["parameters"] > 10_000_000  # the full V3-mini: about 13M parameters
    assert metrics["stages"]["r1_zero"]["steps"] == 2
    assert set(metrics["stages"]["students"]["sizes"]) == {"S", "M"}
    assert (tmp_path / "full" / "stages" / "students" / "M" / "rl" / "final" / "model.safetensors").exists()


def test_compiled_training_follows_the_eager_run(tmp_path: Path):
    """--compile: pretraining V3-mini (MTP, the balance loss, the routing bias moved after each step) with its loss
    under torch.compile gives the eager run's curves. The "aot_eager" backend traces the graphs
    forward and backward as inductor would, without generating code, so the test stays quick on a CPU."""
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for how in (None, "aot_eager"):
        out = tmp_path / str(how)
        counters.clear()
        runs[how] = capstone.run(out, "tiny", stages=["pretrain"], max_steps=4, progress=False, compile=how)
        graphs[how] = counters["stats"]["unique_graphs"]
        assert json.loads((out / "run.json").read_text())["sessions"][-1]["compile"] == how
    assert graphs[None] == 0 and graphs["aot_eager"] >= 1  # the compiled run did compile its loss
    eager, compiled = runs[None]["stages"]["pretrain"], runs["aot_eager"]["stages"]["pretrain"]
    assert len(compiled["loss"]) == 4
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)
    assert compiled["maxvio"] == pytest.approx(eager["maxvio"], abs=1e-4)
    from dslib.train import batch_loss  # the default loss of the other training stages (SFT, students' bases)

    run = lambda **kw: capstone._Run(tmp_path / "s", PRESETS["tiny"], 0, torch.device("cpu"), False, False, **kw)  # noqa: E731
    assert run().compiled(batch_loss) is batch_loss and run(compile="aot_eager").compiled(batch_loss) is not batch_loss


def test_presets_keep_their_promises():
    """small: the CPU preset; full: bigger in every dimension; capped: a smoke test's sizes."""
    s, f = PRESETS["small"], PRESETS["full"]
    assert s.model["num_nextn_predict_layers"] == 1 and f.model["num_nextn_predict_layers"] == 1
    assert f.model["hidden_size"] > s.model["hidden_size"] and f.pretrain_steps > s.pretrain_steps
    assert set(s.students) == set(f.students) == {"S", "M"}
    c = f.capped(3)
    assert (c.pretrain_steps, c.student_steps, c.r1_zero["steps"], c.r1["rl"]["steps"], c.distill["steps"]) == \
        (3, 3, 3, 3, 3) and c.eval_problems <= 8 and c.model == f.model
    assert f.capped(None) is f
