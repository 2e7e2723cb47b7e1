"""What the default monitor costs in a recipe's student stage, part by part, measured in one process.

    python benchmarks/monitor_cost.py cifar10_cnn --set student.train.epochs=5

The monitor (monitor.py) adds three things to a distilled student's training:
- once per stage, the teacher's side of the probe: its logits on the validation probe and its input
  gradients on the first 64 probe samples;
- at the end of each epoch that passes a multiple of `monitor.measure_every` steps (and of the last), the
  student's side: its logits on the probe (retention CKA) and its input gradients;
- every `monitor.gradients_every` steps, the KD and CE parameter gradients of that step (two more backward
  passes).
Each is timed here on the recipe's own models and data, against a KD step with the teacher online (one batch:
teacher forward without a graph, student forward, KL * T^2 mixed with CE, backward, AdamW step), and added up
for the stage: the share of the stage's training steps that the monitor costs (target: <= 5%). Medians of
`--repeats` rounds, the parts interleaved. The step lines that `monitor: off` also switches off are not
counted (a log line every `monitor.every` steps).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from distill import Recipe
from distill import monitor
from distill.engine.inference import fast_pooling
from distill.monitor import kd_ce_consistency, retention_monitor
from distill.pipeline.artifacts import build_role
from distill.pipeline.rundir import RunDir
from distill.pipeline.training import PROBE
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py


def timed(fn, n: int) -> float:
    fn()  # (warm-up)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    skip_without_data(args.recipe, sets=args.overrides)
    torch.manual_seed(0)
    recipe = Recipe.load(args.recipe, args.overrides)
    rd = RunDir(recipe, tempfile.mkdtemp(), echo=lambda m: None)  # (builds and writes nothing)
    teacher, student = build_role(rd, "teacher").eval(), build_role(rd, "student").train()
    data, cfg = rd.data, recipe.cfg
    bs, T, alpha = cfg["data"]["batch_size"], cfg["distill"]["temperature"], cfg["distill"]["alpha"]
    x, y = data.x_train[:bs], data.y_train[:bs]
    probe, labels = data.probe(PROBE)
    opt = torch.optim.AdamW(student.parameters(), foreach=True)

    def step(signals: bool = False) -> None:
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kd = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
        kd, ce = kd * T * T, F.cross_entropy(s, y)
        if signals:
            kd_ce_consistency(student, kd, ce)
        opt.zero_grad()
        (alpha * kd + (1 - alpha) * ce).backward()
        opt.step()

    rounds = {k: [] for k in ("step", "signals", "setup", "measure", "setup_nchw", "measure_nchw")}
    for _ in range(args.repeats):
        rounds["step"].append(timed(step, 20))
        rounds["signals"].append(timed(lambda: step(True), 5) - rounds["step"][-1])
        for suffix, pooling in (("", fast_pooling), ("_nchw", lambda model: contextlib.nullcontext())):
            monitor.fast_pooling = pooling  # (_nchw: the probe's max-pooling channels-first, as before)
            t0 = time.perf_counter()
            measure = retention_monitor(teacher, student, probe, [], labels=labels)
            rounds["setup" + suffix].append(time.perf_counter() - t0)
            rounds["measure" + suffix].append(timed(measure, 3))
        monitor.fast_pooling = fast_pooling
    ms = {k: statistics.median(v) * 1e3 for k, v in rounds.items()}
    # (the distilled student's rows: the labelled ones and those only the teacher labels, data.label_fraction)
    rows = len(data.y_train) + (len(data.x_unlabelled) if data.x_unlabelled is not None else 0)
    per_epoch = -(-rows // bs)
    epochs, m = cfg["student"]["train"]["epochs"], cfg["monitor"]
    steps = per_epoch * epochs
    every = m["measure_every"]
    measured = sum(1 for e in range(1, epochs + 1)
                   if not every or e == epochs or (e * per_epoch) // every > ((e - 1) * per_epoch) // every)
    signals = steps // m["gradients_every"]
    cost = ms["setup"] + measured * ms["measure"] + signals * ms["signals"]
    before = ms["setup_nchw"] + measured * ms["measure_nchw"] + signals * ms["signals"]
    print(f"`python benchmarks/monitor_cost.py {args.recipe}{''.join(' --set ' + o for o in args.overrides)}"
          f" --repeats {args.repeats}` "
          f"(medians of {args.repeats}; {torch.get_num_threads()} threads, torch {torch.__version__})\n")
    print("| part | ms | times in the stage | ms in the stage |\n|---|---|---|---|")
    print(f"| a KD step (teacher online) | {ms['step']:.1f} | {steps} | {steps * ms['step']:,.0f} |")
    print(f"| teacher's side of the probe (once) | {ms['setup']:.1f} | 1 | {ms['setup']:,.0f} |")
    print(f"| student's side, per measured epoch | {ms['measure']:.1f} | {measured} | "
          f"{measured * ms['measure']:,.0f} |")
    print(f"| KD-vs-CE gradients, extra per step measured | {ms['signals']:.1f} | {signals} | "
          f"{signals * ms['signals']:,.0f} |")
    print(f"| (both sides with the probe's max-pooling channels-first) | {ms['setup_nchw']:.1f} + "
          f"{ms['measure_nchw']:.1f} | | {ms['setup_nchw'] + measured * ms['measure_nchw']:,.0f} |")
    print(f"\nthe monitor: {cost:,.0f} ms = **{100 * cost / (steps * ms['step']):.1f}%** of the stage's "
          f"{steps} training steps (target <= 5%); with channels-first pooling {before:,.0f} ms = "
          f"{100 * before / (steps * ms['step']):.1f}%")
    return 0


if __name__ == "__main__":
    run_main(main)
