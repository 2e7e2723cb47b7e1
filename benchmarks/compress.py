"""Compression benchmark: distil, `distill compress`, `distill bench`, per seed, as Markdown tables, with the
targets of the compression issue checked from the measurements.

    python benchmarks/compress.py trec_minilm --seeds 3
    python benchmarks/compress.py mnist_cnn --seeds 3

Each seed is one run folder under runs/bench/compress/<recipe>/seed_<s>. For a text recipe, the teacher is
fine-tuned once (seed 0) and loaded by the other seeds, as in benchmarks/text.py; when that benchmark's
3-layer runs exist (runs/bench/<recipe>/L3_seed<s>), they are copied instead of retrained. The compression
steps are the recipe's `compress` section. Every variant of one seed is measured in the same `distill bench`
run (one thread, batch-1 latency over 200 runs after warm-up), so speed-ups are same-run ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Dict, List

import numpy as np

from distill import Recipe, run
from distill.errors import UserError
from distill.compress.bench import bench, plot_pareto
from distill.compress.pipeline import compress
from distill.io import read_json, write_json
from distill.pipeline.plan import with_seed
from distill.pipeline.rundir import RunDir
from needs_data import run_main, skip_without_data  # benchmarks/needs_data.py

TORCH_VARIANTS = ("fp32", "dynamic", "static", "fp16", "bf16", "torchao", "pt2e")


def stat(values: List[float], fmt: str = ".2f") -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():{fmt}}" + (f" ± {a.std(ddof=1):{fmt}}" if len(a) > 1 else "")


def prepare(recipe: Recipe, out: str, seed: int, teacher: str | None) -> None:
    """The distilled run folder of one seed: copied from benchmarks/text.py's run when there is one."""
    previous = os.path.join("runs", "bench", recipe["name"], f"L3_seed{seed}")
    if recipe.cfg["teacher"]["hf"] and os.path.isfile(os.path.join(previous, "metrics.json")):
        shutil.copytree(previous, out, ignore=shutil.ignore_patterns("compress", "bench", "export"))
        return
    sets = [f"teacher.hf={teacher}", "teacher.finetuned=true"] if teacher else []
    run(with_seed(Recipe.load(recipe.source, sets), seed), out, echo=lambda m: None)


def with_sections(folder: str, recipe: Recipe) -> Recipe:
    """The run's own recipe, with the compress and bench sections of `recipe` (the run may predate them)."""
    cfg = Recipe.load(os.path.join(folder, "recipe.yaml")).cfg
    cfg.update(compress=recipe.cfg["compress"], bench=recipe.cfg["bench"])
    return Recipe(cfg, os.path.join(folder, "recipe.yaml"))


def rows_of(result: Dict) -> Dict:
    return {(r["model"], r["variant"]): r for r in result["results"] if "error" not in r}


def table(results: List[Dict]) -> str:
    keys = [k for k in (("teacher", "fp32"), ("student_scratch", "fp32")) if k in rows_of(results[0])]
    keys += [(r["model"], r["variant"]) for r in results[0]["results"]
             if r["model"] not in ("teacher", "student_scratch")]
    head = ["model", "variant", "test accuracy %", "Δ vs student (points)", "params", "file MB", "p50 ms (batch 1)",
            "speed-up vs student", "samples/s (batch 32)", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key in keys:
        per = [rows_of(r).get(key) for r in results]
        if any(p is None for p in per):
            err = next(r for r in results[0]["results"] if (r["model"], r["variant"]) == key).get("error", "failed")
            lines.append(f"| {key[0]} | {key[1]} | {err[:100]} |" + " |" * (len(head) - 3))
            continue
        size = per[0]["size_bytes"]
        lines.append("| " + " | ".join([
            key[0], key[1], stat([p["accuracy"] * 100 for p in per]),
            stat([p["accuracy_change"] * 100 for p in per]), f"{per[0]['params']:,}",
            f"{size / 2**20:.2f}" if size else "", stat([p["p50_ms"] for p in per], ".3f"),
            stat([p["speedup"] for p in per]), stat([p["throughput"] for p in per], ",.0f"),
            stat([p["peak_mb"] for p in per], ".0f")]) + " |")
    return "\n".join(lines)


def targets(results: List[Dict], text: bool) -> str:
    """The issue's targets, each computed per seed from bench.json and reported as mean ± std."""
    out = []
    rs = [rows_of(r) for r in results]
    s = [r[("student", "fp32")] for r in rs]
    dyn = [r.get(("student", "dynamic")) for r in rs]
    if all(dyn):
        out.append(f"- dynamic int8 (torch) vs fp32 student: {stat([d['speedup'] for d in dyn])}× faster at batch 1, "
                   f"accuracy {stat([d['accuracy_change'] * 100 for d in dyn])} points (target ≥ 1.5×, ≥ −1 point)")
    ort = [min((r[k] for k in (("student", "onnx_dynamic"), ("student", "onnx_static")) if k in r),
               key=lambda v: v["p50_ms"], default=None) for r in rs]
    if all(ort):
        best = [min((v for (m, var), v in r.items() if m == "student" and var in TORCH_VARIANTS),
                    key=lambda v: v["p50_ms"]) for r in rs]
        kinds = ", ".join(sorted({o["variant"] for o in ort}))
        out.append(f"- the faster ONNX Runtime int8 variant of the student ({kinds}, "
                   f"{stat([(o['accuracy'] - st['accuracy']) * 100 for o, st in zip(ort, s)])} points) against the "
                   f"fastest PyTorch variant ({', '.join(sorted({b['variant'] for b in best}))}): "
                   f"{stat([b['p50_ms'] / o['p50_ms'] for b, o in zip(best, ort)])}× at batch 1 (target ≥ 1)")
    pruned = "compress/heads" if text else "compress/channels"
    if all((pruned, "fp32") in r for r in rs):
        names = [m["model"] for m in results[0]["results"]
                 if m["variant"] == "fp32" and m["model"].startswith("compress/")]
        before = names[names.index(pruned) - 1] if names.index(pruned) else "student"
        keep = [r[(pruned, "fp32")]["accuracy"] / st["accuracy"] * 100 for r, st in zip(rs, s)]
        speed = [r[(before, "fp32")]["p50_ms"] / r[(pruned, "fp32")]["p50_ms"] for r in rs]
        rate = [r[(pruned, "fp32")]["throughput"] / r[(before, "fp32")]["throughput"] for r in rs]
        what = "heads pruned to 60%" if text else "filters pruned to 50%"
        out.append(f"- {what}, after fine-tuning: {stat(keep, '.1f')} % of the student's accuracy (target ≥ 98 %); "
                   f"against the model before pruning ({before}): {stat(speed)}× at batch 1, {stat(rate)}× "
                   f"throughput at batch 32 (target: a measured speed-up)")
    small = [r["smallest"] for r in results]
    ratio = [sm["size_bytes"] / r[("teacher", "fp32")]["size_bytes"] for sm, r in zip(small, rs)]
    out.append(f"- smallest deployable file ({small[0]['model']} {small[0]['variant']}): "
               f"1/{stat([1 / x for x in ratio], '.1f')} of the teacher's (target ≤ 1/8)")
    rec = sorted({f"{r['recommended']['model']} {r['recommended']['variant']}" for r in results})
    on = sorted({r["recommended"].get("chosen_on", "test") for r in results})
    out.append(f"- recommended by `distill bench` (fastest within 1 point of the student, chosen on "
               f"{' and '.join(on)} accuracy): {', '.join(rec)}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--plot", default=None, help="draw seed 0's Pareto plot here too")
    p.add_argument("--report-only", action="store_true", help="print the tables from the bench.json files of an "
                                                                 "earlier run of this benchmark, measuring nothing")
    args = p.parse_args()
    skip_without_data(args.recipe)
    os.environ.setdefault("DISTILL_QUIET", "1")
    recipe = Recipe.load(args.recipe)
    base = os.path.join("runs", "bench", "compress", recipe["name"])
    t0 = time.perf_counter()
    results, teacher = [], None
    for seed in range(args.seeds) if not args.report_only else []:
        out = os.path.join(base, f"seed_{seed}")
        print(f"seed {seed} -> {out}", file=sys.stderr, flush=True)
        if not os.path.isfile(os.path.join(out, "metrics.json")):
            prepare(recipe, out, seed, teacher)
        if recipe.cfg["teacher"]["hf"] and teacher is None:
            teacher = os.path.join(out, "teacher")  # fine-tuned once, then loaded by the other seeds
        folder_recipe = with_sections(out, recipe)
        compress(RunDir(folder_recipe, out, echo=lambda m: None))
        results.append(bench(folder_recipe, out, echo=lambda m: None))
    if args.report_only:
        results = [read_json(os.path.join(base, f"seed_{s}", "bench", "bench.json")) for s in range(args.seeds)]
        wall = read_json(os.path.join(base, "wall.json"))
        missing = [f"seed_{s}" for s, r in enumerate(results) if r is None] + ["wall.json"] * (wall is None)
        if missing:
            raise UserError(f"--report-only: {base} has no bench results of {', '.join(missing)}; run without "
                            f"--report-only (with --seeds {args.seeds}) first")
        wall = wall["seconds"]
    else:
        wall = time.perf_counter() - t0
        write_json(os.path.join(base, "wall.json"), {"seconds": wall})
    if args.plot:  # seed 0's accuracy / latency / size plot, as `distill bench` draws it
        plot_pareto(results[0]["results"], args.plot)
    m = results[0]["machine"]
    cmd = " ".join(a for a in sys.argv[1:] if a != "--report-only")
    print(f"`python benchmarks/compress.py {cmd}`\n")
    print(table(results))
    print(f"\nSteps: {', '.join(recipe.cfg['compress']['steps'])}. Mean ± std over seeds {list(range(args.seeds))}; "
          f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, onnxruntime {m['onnxruntime']}, 1 thread; "
          f"wall time {wall / 60:.1f} min.\n")
    print(targets(results, recipe.cfg["teacher"]["hf"] is not None))
    return 0


if __name__ == "__main__":
    run_main(main)
