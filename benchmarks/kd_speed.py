"""Cost of distillation, as ratios measured side by side in one process.

    python benchmarks/kd_speed.py mnist_cnn --repeats 3

Two comparisons, each of whole training runs of the distilled student with the teacher run online:
1. distill's student stage end to end (`train_distilled`: build, train with validation, checkpoints and log
   lines, save), with the monitor on (the default: retention and input gradients per epoch, KD-vs-CE gradient
   consistency every `monitor.every` steps) and off (`monitor: off`), against a plain PyTorch KD loop written
   by hand: the same model, optimizer, batches, losses (KL * T^2 mixed with CE by alpha) and per-epoch
   validation keeping the best epoch, nothing else. The hand-written loop builds its optimizer with PyTorch's
   defaults (one tensor at a time on a CPU); distill's uses multi-tensor (foreach) updates, the same
   arithmetic bit for bit. distill's teacher also max-pools channels-last (`fast_pooling`, the same bits);
   a second hand-written loop does the same, which leaves the engine's own cost.
2. The cost per epoch of cached soft labels vs the online teacher vs the student alone (cross-entropy).
After a round not timed (the first run of anything pays for warming up), configurations are
interleaved and each repeated, every other repeat in the reverse order (so that a machine
speeding up or slowing down within a repeat favours neither side of a pair), and medians compared. Each
repeat's own ratios (stage / plain, monitor on / off) are also given, with their median and a 95% bootstrap
interval of that median: the pairs ran back to back, so the drift between repeats cancels in them.
`--stage-only` times just the plain loop and the two stages, for more repeats in the same time. Targets: the
online stage (monitor off) <= 1.0x the plain loop; the default monitor <= 1.05x the stage with the monitor
off; cached KD <= 1.15x student-only per epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

from distill import Recipe
from distill.engine.inference import fast_pooling
from distill.engine.sampling import batches
from distill.engine.trainer import lr_factor, make_optimizer, set_seed
from distill.pipeline.artifacts import build_role
from distill.pipeline.plan import preflight
from distill.pipeline.rundir import RunDir
from distill.pipeline.training import train_distilled, train_teacher
from distill.teachers import teacher_forward
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py


def plain_kd_loop(rd: RunDir, teacher: torch.nn.Module, fast_pools: bool = False) -> float:
    """What a user writes by hand: the same training as distill's student stage, and nothing else. With
    `fast_pools`, the teacher's forward pass runs inside distill's `fast_pooling` (as distill's online teacher
    does), which separates the engine's own cost from its faster teacher inference."""
    tcfg, dcfg, data = rd.cfg["student"]["train"], rd.cfg["distill"], rd.data
    t0 = time.perf_counter()
    student = build_role(rd, "student")
    set_seed(tcfg["seed"])
    gen = torch.Generator().manual_seed(tcfg["seed"])
    ocfg = tcfg["optimizer"]  # the optimizer as a user writes it, with PyTorch's defaults otherwise
    if ocfg["name"] == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=ocfg["lr"], momentum=ocfg["momentum"],
                              weight_decay=ocfg["weight_decay"], nesterov=ocfg["nesterov"])
    else:
        opt = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[ocfg["name"]](
            student.parameters(), lr=ocfg["lr"], weight_decay=ocfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, tcfg["scheduler"], tcfg["epochs"]))
    T, alpha, best, best_state = dcfg["temperature"], dcfg["alpha"], -1.0, None
    teacher.eval()
    for _ in range(tcfg["epochs"]):
        student.train()
        for idx in batches(len(data.y_train), rd.cfg["data"]["batch_size"], gen):
            x, y = data.x_train[idx], data.y_train[idx]
            with torch.no_grad(), fast_pooling(teacher) if fast_pools else contextlib.nullcontext():
                t_logits = teacher(x)
            logits = student(x)
            kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), reduction="batchmean",
                          log_target=True) * T * T
            loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        student.eval()
        with torch.no_grad():
            acc = (student(data.x_val).argmax(1) == data.y_val).float().mean().item()
        if acc > best:
            best, best_state = acc, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    return time.perf_counter() - t0


def stage_time(recipe: Recipe, teacher_dir: str, monitor: bool, shares: Optional[list] = None) -> float:
    """distill's student stage end to end, in a fresh run folder holding only the trained teacher. With the
    monitor on, the share of the stage's training time spent in the monitor's own code (the stage's
    `monitor_s`, which it times itself) is appended to `shares`."""
    out = tempfile.mkdtemp(prefix="kd_speed_")
    try:
        for name in ("teacher.safetensors", "stages.json", "recipe.yaml"):
            shutil.copy(os.path.join(teacher_dir, name), out)
        rd = RunDir(Recipe.from_dict(recipe.cfg, [] if monitor else ["monitor=off"]), out, echo=lambda m: None,
                    overwrite=True)
        teacher = train_teacher(rd)  # (reused)
        preflight(rd)
        t0 = time.perf_counter()
        info = train_distilled(rd, teacher)
        seconds = time.perf_counter() - t0
        if monitor and shares is not None:
            shares.append(info["monitor_s"] / info["train_time_s"])
        return seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def epoch_time(rd: RunDir, teacher: torch.nn.Module, mode: str) -> float:
    """Seconds per epoch of the student alone (`none`), with cached soft labels, or with the teacher online:
    the mean over as many epochs as take half a second (one, on the larger jobs), since a single epoch of
    digits (20 one-millisecond steps) is shorter than the machine's noise."""
    tcfg, dcfg, data = rd.cfg["student"]["train"], rd.cfg["distill"], rd.data
    student = build_role(rd, "student")
    opt = make_optimizer(list(student.parameters()), tcfg["optimizer"])
    cached = teacher_forward(teacher, data.x_train)[0] if mode == "cached" else None
    T, alpha = dcfg["temperature"], dcfg["alpha"]
    gen, epochs, t0 = torch.Generator().manual_seed(0), 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - t0 < 0.5:
        for idx in batches(len(data.y_train), rd.cfg["data"]["batch_size"], gen):
            x, y = data.x_train[idx], data.y_train[idx]
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            if mode != "none":
                t_logits = cached[idx] if mode == "cached" else teacher_forward(teacher, x)[0]
                kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), reduction="batchmean",
                              log_target=True) * T * T
                loss = (1 - alpha) * loss + alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs += 1
    return (time.perf_counter() - t0) / epochs


def median_interval(values: list, resamples: int = 2000, seed: int = 0) -> tuple:
    """The median of `values` and a 95% percentile-bootstrap interval of it (seeded: the same numbers give the
    same interval)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--stage-only", action="store_true",
                   help="time only the plain loop and the stage with the monitor off and on")
    args = p.parse_args()
    skip_without_data(args.recipe, sets=args.overrides)
    # the teacher online on plain inputs (no augmentation), no feature losses, every label: the case both
    # loops implement
    recipe = Recipe.load(args.recipe, args.overrides + ["data.transforms.random_crop=0", "data.transforms.hflip=false",
                                                        "distill.teacher_outputs=online", "distill.features=[]",
                                                        "data.label_fraction=1"])
    teacher_dir = os.path.join("runs", "bench", f"speed_{recipe['name']}")
    rd = RunDir(recipe, teacher_dir, echo=lambda m: None, overwrite=True)
    preflight(rd)
    teacher = train_teacher(rd)
    times: dict = {k: [] for k in ("plain PyTorch KD loop", "plain loop, teacher pooling as distill's",
                                   "distill stage, monitor off",
                                   "distill stage, monitor on (default)", "epoch: student only",
                                   "epoch: KD, cached soft labels", "epoch: KD, online teacher")}
    shares: list = []  # per timed stage with the monitor on: the monitor's own share of its training time
    runs = [("plain PyTorch KD loop", lambda: plain_kd_loop(rd, teacher)),
            ("plain loop, teacher pooling as distill's", lambda: plain_kd_loop(rd, teacher, fast_pools=True)),
            ("distill stage, monitor off", lambda: stage_time(recipe, teacher_dir, monitor=False)),
            ("distill stage, monitor on (default)", lambda: stage_time(recipe, teacher_dir, monitor=True, shares=shares))]
    runs += [(key, lambda mode=mode: epoch_time(rd, teacher, mode)) for mode, key in (
        ("none", "epoch: student only"), ("cached", "epoch: KD, cached soft labels"),
        ("online", "epoch: KD, online teacher"))]
    if args.stage_only:
        runs = [r for i, r in enumerate(runs) if i in (0, 2, 3)]
        times = {k: v for k, v in times.items() if k in dict(runs)}
    for _, run in runs:  # a round not timed: the first run of each pays for warming up (allocator, kernels)
        run()
    del shares[:]  # (the round not timed above)
    for rep in range(args.repeats):
        for key, run in (runs if rep % 2 == 0 else runs[::-1]):
            times[key].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    # each repeat's own ratios (its runs ran back to back, so a noisy minute moves both sides of a pair alike)
    pairs = {"stage off / plain": [o / p for o, p in zip(times["distill stage, monitor off"],
                                                        times["plain PyTorch KD loop"])],
             "stage off / plain with distill's pooling": [
                 o / p for o, p in zip(times["distill stage, monitor off"],
                                       times.get("plain loop, teacher pooling as distill's", []))],
             "monitor on / off": [n / o for n, o in zip(times["distill stage, monitor on (default)"],
                                                       times["distill stage, monitor off"])]}
    pairs = {k: v for k, v in pairs.items() if v}
    plain, off, on = (med[k] for k in ("plain PyTorch KD loop", "distill stage, monitor off",
                                        "distill stage, monitor on (default)"))
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"`{command}` ({len(rd.data.y_train)} training samples, batch {rd.cfg['data']['batch_size']}, "
          f"{rd.cfg['student']['train']['epochs']} student epochs, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after a round not timed, every other repeat in reverse order)\n")
    print("| run | seconds | ratio |\n|---|---|---|")
    print(f"| plain PyTorch KD loop (teacher online) | {plain:.2f} | 1.000x |")
    pooled = med.get("plain loop, teacher pooling as distill's")
    if pooled:
        print(f"| plain loop, the teacher's max-pooling channels-last as in distill | {pooled:.2f} | "
              f"{pooled / plain:.3f}x |")
    print(f"| distill student stage, monitor off | {off:.2f} | {off / plain:.3f}x |")
    print(f"| distill student stage, monitor on (default) | {on:.2f} | {on / plain:.3f}x |")
    base = med.get("epoch: student only")
    for k in ("epoch: student only", "epoch: KD, cached soft labels", "epoch: KD, online teacher"):
        if k in med:
            print(f"| {k} | {med[k]:.3f} | {med[k] / base:.3f}x of student-only |")
    print("\nper repeat (paired: the two runs of a ratio ran back to back):")
    for k, v in pairs.items():
        mid, lo, hi = median_interval(v)
        print(f"- {k}: {', '.join(f'{r:.3f}' for r in v)}; median **{mid:.3f}**, 95% interval {lo:.3f}-{hi:.3f}")
    mid, lo, hi = median_interval(shares)
    print(f"- the monitor's own code (its measurements, timed by the stage itself: `monitor_s`) / the stage's "
          f"training time: {', '.join(f'{100 * r:.1f}%' for r in shares)}; median **{100 * mid:.1f}%**, "
          f"95% interval {100 * lo:.1f}-{100 * hi:.1f}%")
    verdict = lambda x, target: f"target <= {target}: {'met' if x <= target else 'NOT met'}"  # noqa: E731
    paired = {k: median_interval(v) for k, v in pairs.items()}
    print(f"\nonline stage (monitor off) / plain loop = **{off / plain:.3f}** by the medians of the times, "
          f"**{paired['stage off / plain'][0]:.3f}** paired ({verdict(off / plain, 1.0)} / "
          f"{verdict(paired['stage off / plain'][0], 1.0)})" +
          (f"; against the plain loop with distill's teacher pooling **{off / pooled:.3f}** (the engine's own cost)"
           if pooled else "") +
          f"; monitor on / off = **{on / off:.3f}** by the medians of the times, "
          f"**{paired['monitor on / off'][0]:.3f}** paired ({verdict(on / off, 1.05)} / "
          f"{verdict(paired['monitor on / off'][0], 1.05)}; its own code {100 * mid:.1f}% of the stage: "
          f"target <= 5%: {'met' if mid <= 0.05 else 'NOT met'})" +
          (f"; cached KD / student-only epoch = **{med['epoch: KD, cached soft labels'] / base:.3f}** "
           f"({verdict(med['epoch: KD, cached soft labels'] / base, 1.15)})" if base else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
