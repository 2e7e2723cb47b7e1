"""One process with 2 threads against 2 processes with 1 thread each (torch.distributed, gloo), side by side.

    python benchmarks/distributed.py mnist_cnn trec_minilm --repeats 2

Per recipe, the teacher is trained once (1 process); then the distilled student's stage (`distill
train-student`: the teacher's soft-label pass into a fresh cache, then the student's training) runs in each
layout, the layouts interleaved and repeated, and medians compared. The same machine and the same total
thread count for both. Reported: the student's training epoch time (validation excluded) and samples per
second, the soft-label pass, and the whole command's wall time (process start-up included), each as
2 processes / 1 process.

    python benchmarks/distributed.py --allreduce 409034 17392134

times gloo's all-reduce of that many fp32 gradients between 2 processes on 127.0.0.1 (median of 10): the
communication of one optimizer step of a student of that size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py

LAYOUTS = (("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1))


def distill(args, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DISTILL_QUIET": "1", "MASTER_ADDR": "127.0.0.1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distill", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(folder: str) -> dict:
    log = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    epochs = [r for r in log if r.get("model") == "student" and "train_time_s" in r and "step" not in r]
    soft = next(r for r in log if "cache_key" in r and not r["hit"])
    return {"epoch_s": statistics.median(r["train_time_s"] for r in epochs), "soft_s": soft["seconds"],
            "samples": soft["samples"]}


def bench(recipe: str, sets: list, repeats: int, root: str) -> list:
    base = os.path.join(root, recipe, "teacher_run")
    common = [recipe, "--no-baseline", *(a for s in sets for a in ("--set", s))]
    if not os.path.isfile(os.path.join(base, "teacher.safetensors")) and \
            not os.path.isdir(os.path.join(base, "teacher")):
        distill(["train-teacher", *common, "--out", base], os.cpu_count() or 2)
    results = {name: [] for name, _, _ in LAYOUTS}
    for r in range(repeats):
        for name, nproc, threads in LAYOUTS:
            work = os.path.join(root, recipe, f"{nproc}x{threads}_{r}")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work)
            wall = distill(["train-student", *common, "--out", work, "--set",
                            f"output.cache_dir={os.path.join(work, 'cache')}", "--nproc", str(nproc)], threads)
            results[name].append({**measure(work), "wall_s": wall})
            print(f"{recipe} {name} repeat {r}: {results[name][-1]}", file=sys.stderr)
    rows = []
    for name, _, _ in LAYOUTS:
        runs = results[name]
        med = {k: statistics.median(x[k] for x in runs) for k in ("epoch_s", "soft_s", "wall_s")}
        rows.append({"recipe": recipe, "layout": name, **med, "samples_per_s": runs[0]["samples"] / med["epoch_s"]})
    return rows


def markdown(rows: list, command: str) -> str:
    lines = [f"`{command}`", "", "| recipe | layout | student epoch s | samples/s | epoch x | soft-label pass s | "
             "pass x | whole command s | command x |", "|---|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        one = rows[i]
        for row in rows[i:i + 2]:
            x = {k: one[k] / row[k] for k in ("epoch_s", "soft_s", "wall_s")}
            lines.append(f"| {row['recipe']} | {row['layout']} | {row['epoch_s']:.2f} | {row['samples_per_s']:,.0f} | "
                         f"{x['epoch_s']:.2f} | {row['soft_s']:.2f} | {x['soft_s']:.2f} | {row['wall_s']:.1f} | "
                         f"{x['wall_s']:.2f} |")
    lines += ["", f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
                  f"{torch.__version__}; medians; x: the 1-process time over this layout's (above 1: faster than "
                  f"1 process)."]
    return "\n".join(lines)


def allreduce_worker(sizes: list) -> None:
    """Under torchrun: the median time of an all-reduce of each size of fp32 values (printed by rank 0)."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    for n in sizes:
        grad, times = torch.ones(n), []
        for _ in range(12):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(grad)
            times.append(time.perf_counter() - t0)
        if dist.get_rank() == 0:
            print(f"| {n:,} | {n * 4 / 2**20:.1f} | {statistics.median(times[2:]) * 1000:.1f} |")
    dist.destroy_process_group()


def allreduce(sizes: list) -> None:
    print(f"`python benchmarks/distributed.py --allreduce {' '.join(map(str, sizes))}`\n")
    print("| gradients (fp32 values) | MB | gloo all-reduce, 2 processes, ms |\n|---|---|---|", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    os.path.abspath(__file__), "--allreduce", *map(str, sizes)], check=True, env=env)


def main() -> None:
    if "--allreduce" in sys.argv:
        sizes = [int(v) for v in sys.argv[sys.argv.index("--allreduce") + 1:]]
        return allreduce_worker(sizes) if "RANK" in os.environ else allreduce(sizes)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run (default: 2 teacher epochs, 2 student epochs)")
    p.add_argument("--root", default=os.path.join("runs", "bench", "distributed"))
    args = p.parse_args()
    skip_without_data(*args.recipes, sets=args.sets)
    sets = args.sets or ["teacher.train.epochs=2", "student.train.epochs=2"]  # (a recipe's own student epochs
    # would keep a top-level train.epochs from reaching the student: trec_minilm's 4 did)
    rows = [row for recipe in args.recipes for row in bench(recipe, sets, args.repeats, args.root)]
    print(markdown(rows, "python benchmarks/distributed.py " + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    run_main(main)
