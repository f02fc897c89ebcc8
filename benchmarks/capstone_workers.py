"""Two workers against one for the capstone's training on a CPU (chapter 09, `python -m dslib capstone --workers`).

The capstone's CPU preset (`small`) trains V3-mini and, beside it, two small dense students that need nothing from it.
Contenders, on the same batches of the world's corpus, the same steps, in the preset's proportion (each student takes
student_steps / pretrain_steps times V3-mini's steps):
- one worker: V3-mini's pretraining steps (MTP loss) and then the students' steps, one after another, in one
  process with all the threads (`--workers 1`);
- two workers: the same steps in two processes side by side, one training V3-mini and the other the students, each
  with an equal share of the threads (`--workers 2`).

The work is the same in both, so the ratio of the wall clocks is the speedup of two workers. Each process times its own
steps; rounds alternate between the contenders and the median round counts. Prints the per-step times and the
headline ratio on its last line.

    python benchmarks/capstone_workers.py [--steps 30] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch


def _train(job: str, steps: int, threads: int, start_step: int) -> float:
    """Seconds for `steps` training steps of V3-mini (job "v3"), or for the preset's share of them for each student
    (job "students": S then M), on `threads` threads."""
    import dslib
    from dslib import capstone as cap
    from dslib.mtp import mtp_loss
    from dslib.train import batch_loss, param_groups
    from dslib.transformer import Transformer
    from dslib.v3 import DeepSeekV3
    from dslib.world import PackedData

    dslib.keep_freed_memory()
    torch.set_num_threads(threads)
    p = cap.PRESETS["small"]
    world = cap._world(p)
    tok = world.tokenizer
    data = PackedData([d.text for d in world.corpus()], tok, p.seq_len, p.batch, seed=0)
    torch.manual_seed(0)
    if job == "v3":
        models = [(DeepSeekV3(cap.v3_config(p, tok.vocab_size)), lambda m, b: mtp_loss(m, b, 0.3)[0])]
    else:
        models = [(Transformer(cap.student_config(p, size, tok.vocab_size)), batch_loss) for size in p.students]
        steps = round(steps * p.student_steps / p.pretrain_steps)
    t = 0.0
    for model, loss_fn in models:
        model.train()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        for s in range(start_step, start_step + steps + 2):
            b = data.batch(s)
            t0 = time.perf_counter()
            loss = loss_fn(model, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if s >= start_step + 2:  # the first two steps warm up
                t += time.perf_counter() - t0
    return t


def _worker(job: str, steps: int, threads: int, start_step: int, barrier, queue) -> None:
    barrier.wait()  # both start together
    queue.put((job, _train(job, steps, threads, start_step)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps of each model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="the whole budget (default: PyTorch's)")
    args = p.parse_args()
    threads = args.threads or torch.get_num_threads()
    half = max(1, threads // 2)
    print(f"{threads} threads; two workers get {half} each; {args.steps} steps of V3-mini and the small preset's share "
          f"of them for each student")
    mp = multiprocessing.get_context("spawn")
    one, two, parts = [], [], {"v3": [], "students": []}
    for r in range(args.rounds):
        start = 1000 * r
        with mp.Pool(1) as pool:  # one worker: a fresh process, as a run would be
            a = pool.apply(_train, ("v3", args.steps, threads, start))
            b = pool.apply(_train, ("students", args.steps, threads, start))
        one.append(a + b)
        barrier, queue = mp.Barrier(2), mp.Queue()
        procs = [mp.Process(target=_worker, args=(job, args.steps, half, start, barrier, queue))
                 for job in ("v3", "students")]
        for pr in procs:
            pr.start()
        got = dict(queue.get() for _ in procs)
        for pr in procs:
            pr.join()
        two.append(max(got.values()))
        for k in parts:
            parts[k].append(got[k])
        print(f"round {r + 1}: one worker {a:.1f} s (V3-mini) + {b:.1f} s (students) = {a + b:.1f} s; two workers: "
              f"V3-mini {got['v3']:.1f} s beside the students {got['students']:.1f} s")
    med_one, med_two = statistics.median(one), statistics.median(two)
    print(f"median wall clock: one worker {med_one:.1f} s, two workers {med_two:.1f} s "
          f"(V3-mini alone on {half} thread(s) beside the students: {statistics.median(parts['v3']):.1f} s)")
    print(f"two workers vs one: {med_one / med_two:.2f}x")


if __name__ == "__main__":
    main()
