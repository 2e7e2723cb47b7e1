"""Bit-identical weights across a refactoring: train the same recipes at two code versions, compare the models.

    python benchmarks/equivalence.py [--base COMMIT] [--head COMMIT|worktree] [--only NAME ...] [--keep DIR]

--base (default 9c7d618, the last commit before the restructuring) is checked out with `git worktree add
--detach` into a temp folder; --head defaults to this working tree as it is (uncommitted changes included).
Both versions run `python -m distill.cli run RECIPE --out OUT --set ...` with this same interpreter, one after
the other, with PYTHONPATH (and the working folder) set to that version's root, OMP_NUM_THREADS=1 (bitwise
equality holds per thread count), DISTILL_QUIET=1, HF_HUB_OFFLINE=1, no GPU and a fresh DISTILL_CACHE per
version. Every model both runs saved (teacher, student_scratch, student, assistant_*; a .safetensors file or
a Hugging Face folder's model.safetensors) is compared tensor by tensor: same keys, dtype, shape and bytes.
Prints a Markdown table (case, model, tensors, identical?, max abs diff, test accuracy base/head, whether the
files are byte-identical: information only, headers may legitimately differ), lists the differing tensors,
and writes report.md, report.json and the run folders to --keep DIR. Exit code 0 when every compared model
is identical, 1 when one differs or a run failed. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from needs_data import run_main  # benchmarks/needs_data.py

ROOT = Path(__file__).resolve().parents[1]  # the main repository (data paths resolve against it)
TEXT_SUBSET = ["data.train_subset=1200", "teacher.train.epochs=2", "student.train.epochs=2"]  # full: ~4,840 rows, 3/4 epochs
# the recipe both versions run, by name; a version that has the renamed recipe runs that one instead
RENAMED = {"digits": "digits_all_labels"}  # (the default became the label-scarce demo; the old one was kept)
CASES = {  # name: (recipe, overrides, the same for both versions)
    "digits": ("digits", []),
    "digits_layers": ("digits_layers", []),
    "mnist_cnn": ("mnist_cnn", ["train.seed=0"]),
    "trec_minilm": ("trec_minilm", ["train.seed=0", *TEXT_SUBSET]),
}
MODEL = re.compile(r"^(teacher|student_scratch|student|assistant_\d+)(\.safetensors)?$")
ENV = {"OMP_NUM_THREADS": "1", "DISTILL_QUIET": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


class Version:
    """One code version: its root folder, its environment, and a check that `import distill` resolves there."""

    def __init__(self, role: str, spec: str, tmp: Path) -> None:
        self.role, self.error = role, None
        if spec == "worktree":
            self.root, dirty = ROOT, len(git("status", "--porcelain", "--untracked-files=no").splitlines())
            self.label, self.worktree = f"worktree ({git('rev-parse', '--short', 'HEAD')} + {dirty} changed files)", None
        else:
            commit = git("rev-parse", "--verify", f"{spec}^{{commit}}")
            self.root = self.worktree = tmp / f"src_{role}"
            git("worktree", "add", "--detach", str(self.root), commit)
            self.label = f"{spec} ({commit[:7]})"
        self.env = {**os.environ, **ENV, "PYTHONPATH": str(self.root), "DISTILL_CACHE": str(tmp / f"cache_{role}")}
        p = subprocess.run([sys.executable, "-c", "import distill, os; print(os.path.dirname(distill.__file__))"],
                           cwd=self.root, env=self.env, capture_output=True, text=True)
        where = Path(p.stdout.strip() or "?").resolve()
        if p.returncode or self.root.resolve() not in where.parents:
            self.error = f"`import distill` does not resolve inside {self.root}: {(p.stdout + p.stderr)[-800:]}"
        log(f"{role}: {self.label}, distill from {where}" + (f"  ERROR: {self.error}" if self.error else ""))

    def run(self, recipe: str, overrides: list, out: Path) -> dict:
        cmd = [sys.executable, "-m", "distill.cli", "run", recipe, "--out", str(out)]
        cmd += [a for o in overrides for a in ("--set", o)]
        if self.error:
            return {"ok": False, "seconds": 0.0, "error": self.error, "command": cmd}
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        (out.parent / f"{out.name}.stdout").write_text(p.stdout)
        (out.parent / f"{out.name}.stderr").write_text(p.stderr)
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        return {"ok": p.returncode == 0, "seconds": round(time.perf_counter() - t0, 1), "command": cmd,
                "error": None if p.returncode == 0 else f"exit code {p.returncode}:\n{tail}"}


def data_overrides(recipe: str) -> tuple:
    """Absolute --set overrides for the recipe's relative data files (they point at ../shared/data beside
    the main repository, which a worktree in /tmp would miss), and the reason to skip when one is absent."""
    files = sorted((ROOT / "distill").glob(f"**/recipes/{recipe}.yaml"))
    raw = yaml.safe_load(files[0].read_text()) if files else {}
    sets = []
    for key in ("path", "test_path"):
        value = ((raw or {}).get("data") or {}).get(key)
        if value:
            path = Path(value) if os.path.isabs(value) else (ROOT / value).resolve()
            if not path.exists():
                return [], f"data.{key}: {path} is absent"
            sets.append(f"data.{key}={path}")
    return sets, None


def weights(folder: Path) -> dict:
    """Model name -> its safetensors file, for every model a run folder holds."""
    found = {}
    for p in folder.iterdir() if folder.is_dir() else []:
        m = MODEL.match(p.name)
        if m and (p.is_file() == bool(m.group(2))):
            f = p if p.is_file() else p / "model.safetensors"
            if f.is_file():
                found[m.group(1)] = f
    return found


def compare(fa: Path, fb: Path) -> dict:
    a, b = load_file(str(fa)), load_file(str(fb))
    diffs = [{"tensor": k, "why": "only in " + ("base" if k in a else "head")} for k in sorted(set(a) ^ set(b))]
    max_diff = 0.0
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append({"tensor": k, "why": f"{x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"})
        elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):  # bitwise
            d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            max_diff = max(max_diff, d)
            diffs.append({"tensor": k, "why": f"bits differ, max abs diff {d:.3g}", "max_abs_diff": d})
    return {"tensors": len(set(a) | set(b)), "identical": not diffs, "max_abs_diff": max_diff, "diffs": diffs,
            "file_bytes_identical": fa.read_bytes() == fb.read_bytes()}


def accuracies(folder: Path) -> dict:
    try:
        return {k: v.get("accuracy") for k, v in json.loads((folder / "metrics.json").read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def run_case(name: str, base: Version, head: Version, work: Path) -> dict:
    recipe, overrides = CASES[name]
    sets, skip = data_overrides(recipe)
    result = {"case": name, "recipe": recipe, "overrides": overrides + sets, "models": [], "runs": {}}
    if skip:
        log(f"[{name}] skipped: {skip}")
        return {**result, "skipped": skip}
    for v in (base, head):
        log(f"[{name}] {v.role} {v.label}: running {recipe} {' '.join(overrides)}")
        named = RENAMED.get(recipe, recipe)
        named = named if (v.root / "distill" / "recipes" / f"{named}.yaml").exists() else recipe
        r = result["runs"][v.role] = v.run(named, overrides + sets, work / name / v.role)
        log(f"[{name}] {v.role}: {'done' if r['ok'] else 'FAILED'} in {r['seconds']} s")
    if not all(r["ok"] for r in result["runs"].values()):
        return result
    wa, wb = weights(work / name / "base"), weights(work / name / "head")
    acc = {role: accuracies(work / name / role) for role in ("base", "head")}
    for model in sorted(set(wa) | set(wb)):
        if model in wa and model in wb:
            row = compare(wa[model], wb[model])
        else:
            row = {"identical": False, "missing": "base" if model not in wa else "head", "diffs": []}
        row.update(model=model, acc_base=acc["base"].get(model), acc_head=acc["head"].get(model))
        result["models"].append(row)
    return result


def fmt_acc(a) -> str:
    return "—" if a is None else f"{a:.4f}"


def markdown(results: list, base: Version, head: Version) -> str:
    lines = [f"base: {base.label}; head: {head.label}; python {sys.executable}, torch {torch.__version__}", "",
             "| case | model | tensors | identical? | max abs diff | accuracy base | accuracy head | file bytes identical |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        secs = ", ".join(f"{k} {v['seconds']} s" for k, v in r["runs"].items())
        if r.get("skipped"):
            lines.append(f"| {r['case']} | — | — | skipped: {r['skipped']} | | | | |")
            continue
        failed = {k: v for k, v in r["runs"].items() if not v["ok"]}
        if failed:
            lines.append(f"| {r['case']} | — | — | ERROR ({', '.join(failed)} run failed) | | | | |")
            notes += [f"{r['case']} / {k}: `{' '.join(v['command'][1:])}`\n```\n{v['error']}\n```" for k, v in failed.items()]
            continue
        if not r["models"]:
            lines.append(f"| {r['case']} | — | — | ERROR (no models saved) | | | | |")
        for m in r["models"]:
            if m.get("missing"):
                ident, tensors, diff, fbytes = f"NO (missing in {m['missing']})", "—", "—", "—"
            else:
                ident = "yes" if m["identical"] else f"NO ({len(m['diffs'])} differ)"
                tensors, diff, fbytes = m["tensors"], f"{m['max_abs_diff']:.3g}", "yes" if m["file_bytes_identical"] else "no"
            lines.append(f"| {r['case']} | {m['model']} | {tensors} | {ident} | {diff} | {fmt_acc(m['acc_base'])} | "
                         f"{fmt_acc(m['acc_head'])} | {fbytes} |")
            notes += [f"{r['case']} / {m['model']}: {d['tensor']}: {d['why']}" for d in m["diffs"][:20]]
        notes.append(f"{r['case']}: `--set {' --set '.join(r['overrides'])}`; {secs}" if r["overrides"] else
                     f"{r['case']}: no overrides; {secs}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def passed(results: list) -> bool:
    ran = [r for r in results if not r.get("skipped")]
    return all(r["models"] and all(m["identical"] for m in r["models"]) for r in ran)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="9c7d618", help="a commit (default: 9c7d618)")
    p.add_argument("--head", default="worktree", help='a commit, or "worktree" (default: this working tree)')
    p.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES), metavar="NAME",
                   help=f"cases to run: {', '.join(CASES)}")
    p.add_argument("--keep", default=None, metavar="DIR", help="write report.md, report.json and the runs here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distill-equivalence-"))
    work = Path(args.keep).resolve() if args.keep else tmp / "runs"
    versions, t0 = [], time.perf_counter()
    try:
        for role, spec in (("base", args.base), ("head", args.head)):
            versions.append(Version(role, spec, tmp))
        results = [run_case(name, *versions, work) for name in args.only]
        report = markdown(results, *versions)
        print(report)
        if args.keep:
            work.mkdir(parents=True, exist_ok=True)
            (work / "report.md").write_text(report + "\n")
            (work / "report.json").write_text(json.dumps({"base": versions[0].label, "head": versions[1].label,
                                                          "passed": passed(results), "cases": results}, indent=1))
        log(f"total {time.perf_counter() - t0:.0f} s; {'all identical' if passed(results) else 'NOT identical'}")
        return 0 if passed(results) else 1
    except subprocess.CalledProcessError as e:  # an unknown commit, a worktree that cannot be made
        log(f"error: {' '.join(e.cmd)}: {e.stderr.strip()}")
        return 2
    finally:
        for v in versions:
            if v.worktree:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(v.worktree)])
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"])  # also one whose Version() failed midway


if __name__ == "__main__":
    run_main(main)
