"""`distill bench RUN_DIR`: every model of a run and its deployable variants, measured side by side.

Models: the teacher, both students, and each model `distill compress` saved. The distilled student and the
last compressed model are also measured as deployable variants (bench.variants):

    fp32          the PyTorch model as saved
    dynamic       int8 Linear weights, activations quantized per batch (torch.ao quantize_dynamic)
    static        int8 with activation ranges calibrated on training samples (torch FX; CNNs and MLPs)
    fp16, bf16    half-precision weights
    onnx          ONNX Runtime, fp32
    onnx_dynamic  ONNX Runtime, dynamic int8
    onnx_static   ONNX Runtime, static int8 (QDQ, calibrated on training samples)
    torchao       torchao int8 dynamic activation + int8 weight, when torchao is installed
    pt2e          torch.export + PT2E X86 Inductor quantizer

A language model is benched as fp32, dynamic, fp16 and bf16 (the other backends trace fixed-shape graphs of
classifiers): its accuracy column is next-token accuracy on the test completions, with their perplexity
beside it; its latency is milliseconds per step of greedy decoding with the KV cache at batch 1 (the
prefill measured apart and taken out), its throughput decoded tokens/s at evaluate.throughput_batch, with the
prefill latency of a test prompt and the peak memory of decoding.

A backend is chosen by measurement: each variant runs in a process of its own (so peak memory is its own),
forked from one that has done the imports once, on a fixed thread count, after warm-up, and one that fails
is reported with its error, not hidden. The recommended deployable model is the fastest at batch 1 whose
validation accuracy is within bench.max_accuracy_drop of the distilled student's (chosen on the validation
split, as checkpoints are; the test split is only reported; on test accuracy when there is no validation
split, and the recommendation says so).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

from ..errors import UserError, did_you_mean, raise_if_signalled
from ..io import read_run_json, save_figure, write_json, write_text
from ..progress import bar
from ..roles import MODELS_OUT

INT8 = ("dynamic", "static", "onnx_dynamic", "onnx_static", "torchao", "pt2e")


def machine() -> Dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort, "quantized_engine": torch.backends.quantized.engine, "system": platform.platform()}


def chain_names(folder: str) -> List[str]:
    """`compress/<step>` of each model of compress/compress.json, the last compress's chain."""
    path = os.path.join(folder, "compress", "compress.json")
    models = read_run_json(path, {}).get("models", [])
    if not isinstance(models, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                               and re.fullmatch(r"\w[\w.-]*", r["name"]) for r in models):
        raise UserError(f"{path}: 'models' is not a list of records with a step's name; run distill compress again")
    return [f"compress/{r['name']}" for r in models]


def compressed_models(folder: str) -> List[Tuple[str, str]]:
    """(name, path) of each model of the chain, found in this run folder by its step's name (the folder may
    have been moved or copied since), refused when one is missing."""
    from ..pipeline.artifacts import require_saved
    return [(name, require_saved(folder, name)) for name in chain_names(folder)]


def plan(folder: str, variants: List[str], only: Optional[List[str]] = None) -> List[Tuple[str, str, str]]:
    """(model name, model path, variant) for every measurement of this run folder (of the models `only`
    names, and the distilled student, when given)."""
    from ..pipeline.artifacts import require_saved
    variants = ["fp32"] + [v for v in variants if v != "fp32"]  # (every ratio is against the student in fp32)
    skipped = {k for k, v in read_run_json(os.path.join(folder, "metrics.json"), {}).items()
               if isinstance(v, dict) and v.get("skipped")}
    models = [(name, require_saved(folder, name)) for name in MODELS_OUT if name not in skipped]  # (baseline: false)
    compressed = compressed_models(folder)
    deploy = ["student"] + ([compressed[-1][0]] if compressed else [])
    names = [n for n, _ in compressed]
    # int8 after training (PTQ) of the model that QAT started from, to compare with QAT itself (the compressed
    # model before it, or compress.source when QAT is the first step)
    source = read_run_json(os.path.join(folder, "compress", "compress.json"), {}).get("source", "student")
    ptq = [n for i, n in enumerate([source, *names][:-1]) if names[i].endswith("/qat")]
    everything = models + compressed
    if only is not None:
        known = [n for n, _ in everything]
        for i, name in enumerate(only):
            if name not in known:
                raise UserError(f"bench.models[{i}]: {name!r} is not a model of {folder}"
                                f"{did_you_mean(str(name), known)}; it has {', '.join(known)}")
        everything = [(n, p) for n, p in everything if n in only or n == "student"]
        deploy += [n for n in only if n.startswith("compress/")]  # (named to be measured: as it would deploy)
    rows = []
    for name, path in everything:
        for v in (variants if name in deploy else ["fp32"]):
            rows.append((name, path, v))
        if name not in deploy and (name.endswith("/qat") or name in ptq):  # QAT models are deployed as int8
            rows += [(name, path, v) for v in ("dynamic", "onnx_dynamic") if v in variants]
    return rows


def bench(recipe, folder: str, echo=print) -> Dict[str, Any]:
    from ..pipeline.artifacts import require_same_data
    from ..pipeline.rundir import require_current
    cfg = recipe.cfg
    from ..recipe import LM_DATASETS
    from .measure import DECODE, LM_VARIANTS, lm_runs
    lm, variants = cfg["data"]["dataset"] in LM_DATASETS, cfg["bench"]["variants"]
    if lm and set(variants) - set(LM_VARIANTS):
        echo(f"bench: {', '.join(v for v in variants if v not in LM_VARIANTS)}: not for language models, which "
             f"are benched as {', '.join(LM_VARIANTS)}")
        variants = [v for v in variants if v in LM_VARIANTS]
    rows = plan(folder, variants, cfg["bench"]["models"])
    loaded: Dict[str, Any] = {}  # the data, and the model whose variants are being written
    stale = set()
    paths = {n: p for n, p, _ in rows}
    for name, path in paths.items():  # (every row scores its model on the test split)
        try:
            require_current(folder, name, path, "bench")
            require_same_data(folder, name, _data_for(cfg, name, loaded))
        except UserError as e:
            if not name.startswith("compress/"):  # (the run's own models: the run is out of date)
                raise
            echo(f"bench: {e}; left out")  # (a compressed model made before the run was trained again)
            stale.add(name)
    chain = chain_names(folder)
    for name in chain[next((i for i, n in enumerate(chain) if n in stale), len(chain)) + 1:]:
        if name not in stale and name in paths:  # (each step distils the model before it: one
            echo(f"bench: {name}: made from a model of the chain that is left out; left out")  # made from another)
            stale.add(name)
    why = compressed_out_of_date(folder)
    if why and any(n.startswith("compress/") for n, _, _ in rows):
        echo(f"bench: the compressed models were {why}; left out (run distill compress again)")
        stale |= {n for n, _, _ in rows if n.startswith("compress/")}
    rows = [r for r in rows if r[0] not in stale]
    for record in ("bench.json", "bench.md", "pareto.png"):  # (an earlier bench's record goes before its files:
        path = os.path.join(folder, "bench", record)       # a bench stopped midway leaves no recommendation of
        if os.path.isfile(path):                           # a file it has removed)
            os.remove(path)
    os.makedirs(os.path.join(folder, "bench", "files"), exist_ok=True)
    results: List[Dict[str, Any]] = []
    with _Server() as server:
        for name, path, variant in bar(rows, desc="bench", unit="variant"):
            error = _write_variant_file(cfg, folder, name, path, variant, loaded)
            raise_if_signalled()  # (a stop asked while FX tracing wrote a static int8 file: torch drops it)
            r = {"model": name, "variant": variant, "error": error} if error else \
                _measure_in_child(server, cfg, folder, name, path, variant)
            results.append(r)
            echo(f"bench: {name} {variant}: " + (r["error"] if "error" in r else
                                                  f"accuracy {r['accuracy']:.4f}, p50 {r['p50_ms']:.3f} ms"
                                                  + (" per token" if lm else "")))
    from ..pipeline.rundir import stage_fingerprints
    versions = stage_fingerprints(folder)
    for r in results:  # (which version of each model was measured: report and doctor flag it once retrained)
        r["fingerprint"] = versions.get(r["model"])
    summary = summarise(results, cfg["bench"]["max_accuracy_drop"])
    out = {"machine": machine(), "threads": cfg["evaluate"]["threads"], "batch": cfg["evaluate"]["throughput_batch"],
           "latency_runs": lm_runs(cfg) if lm else cfg["bench"]["latency_runs"],
           "settings": dict(cfg["bench"]),  # (as given to this bench, --set included: the doctor judges by them)
           "results": results, **summary, **({"language_model": True, "decode_tokens": DECODE} if lm else {})}
    table = format_bench(out)
    out["table"] = table
    write_json(os.path.join(folder, "bench", "bench.json"), out)
    write_text(os.path.join(folder, "bench", "bench.md"), table + "\n")
    plot = os.path.join(folder, "bench", "pareto.png")
    if not plot_pareto(results, plot, lm):
        echo("bench: matplotlib is not installed, so no pareto.png (pip install -e '.[plot]')")
    return out


def compressed_out_of_date(folder: str) -> Optional[str]:
    """Why compress.json's models are not made from the run's models as they are now (None when they are):
    the teacher or the compressed source trained again since."""
    from ..pipeline.rundir import stage_fingerprints
    made = read_run_json(os.path.join(folder, "compress", "compress.json"), {}).get("made_from")
    if not isinstance(made, dict):  # (records from before say nothing)
        return None
    from ..pipeline.rundir import UNFINISHED
    now = stage_fingerprints(folder)
    changed = [k for k, v in made.items() if now.get(k) != v or v == UNFINISHED]
    return f"compressed from earlier versions of {' and '.join(changed)}, trained again since" if changed else None


def model_versions(folder: str) -> Dict[str, Optional[str]]:
    """The version of each model a run folder holds now, as bench rows are compared with (`is_stale`): its
    stage's fingerprint; none for a model whose file is gone."""
    from ..pipeline.artifacts import is_saved
    from ..pipeline.rundir import stage_fingerprints
    return {k: v for k, v in stage_fingerprints(folder).items() if is_saved(folder, k)}


def is_stale(row: Dict[str, Any], versions: Dict[str, Optional[str]]) -> bool:
    """A bench row measured on an earlier version of its model (retrained, re-compressed, or gone since, or
    being made again by a run that stopped), by `model_versions`."""
    from ..pipeline.rundir import UNFINISHED
    return "fingerprint" in row and (row["fingerprint"] != versions.get(row.get("model"))
                                     or row["fingerprint"] == UNFINISHED)


def _data_for(cfg: Dict[str, Any], name: str, loaded: Dict[str, Any]) -> Any:
    """The data model `name` reads (kept in `loaded` while the next model reads the same)."""
    from ..data import load_data
    from ..pipeline.rundir import data_cfg_for
    data_cfg = data_cfg_for(cfg, name)
    if loaded.get("data_cfg") != data_cfg:
        loaded.update(data_cfg=data_cfg, data=load_data(data_cfg))
    return loaded["data"]


def _write_variant_file(cfg: Dict[str, Any], folder: str, name: str, path: str, variant: str,
                        loaded: Dict[str, Any]) -> Optional[str]:
    """Write the variant's deployable file here (the child only loads it); an error message if that fails."""
    from ..pipeline.artifacts import load_model_at
    from .measure import failure, variant_path, write_file
    if variant_path(folder, name, variant) is None:  # (a variant without a file of its own)
        return None
    _data_for(cfg, name, loaded)
    if loaded.get("name") != name:  # (a model's rows come together: its files of an earlier bench go first, so
        loaded.update(name=name, model=load_model_at(path, name))  # none is reused, as onnx_* reused the onnx file)
        _drop_files(folder, name)
    try:
        write_file(loaded["model"], variant, loaded["data"], cfg, folder, name, path)
    except Exception as e:  # a backend that fails or does not apply is a row of the table, not the end of the bench
        return failure(e)
    return None


def _drop_files(folder: str, name: str) -> None:
    """The deployable files an earlier bench wrote of model `name` (of an earlier version of it, maybe)."""
    files = os.path.join(folder, "bench", "files")
    prefix = f"{name.replace('/', '-')}-"
    for entry in os.listdir(files) if os.path.isdir(files) else []:
        if entry.startswith(prefix):
            path = os.path.join(files, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


class _Server:
    """`python -m distill.compress.measure` for the length of one bench: a fresh interpreter (none of the
    caller's code) that imports torch, distill and the libraries a measurement uses once (measure.PRELOAD),
    then forks a process per measurement, so each has its own peak memory, a crash fails its row only, and
    none pays the imports again."""

    def __enter__(self) -> "_Server":
        self.proc: Optional[subprocess.Popen] = None  # (started by the first measurement)
        return self

    def ask(self, job: Dict[str, Any]) -> Dict[str, Any]:
        """The numbers of one measurement, or {"error": why}."""
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-m", "distill.compress.measure"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         start_new_session=True)  # (a group of its own: see __exit__)
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        return json.loads(line) if line else {"error": f"the measuring process ended (exit code {self.proc.poll()})"}

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """At the end, the server's loop ends with its input; stopped (Ctrl-C, SIGTERM, an error), the server
        and the measurement it forked are killed at once, by their process group (the server's own pid)."""
        if self.proc is None:
            return
        if exc_type is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
                return
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:  # (not reaped yet: its pid, and so its group, is still its own)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()


def _measure_in_child(server: _Server, cfg: Dict[str, Any], folder: str, name: str, path: str,
                      variant: str) -> Dict[str, Any]:
    job = {"cfg": cfg, "folder": folder, "name": name, "path": path, "variant": variant}
    return {"model": name, "variant": variant, **server.ask(job)}


def summarise(results: List[Dict[str, Any]], max_drop: float) -> Dict[str, Any]:
    """Ratios against the distilled student in fp32, and the recommendations: the fastest at batch 1 (and the
    fastest int8) within `max_drop` of the student's validation accuracy (test accuracy when the data has no
    validation split)."""
    ok = [r for r in results if "error" not in r]
    ref = next((r for r in ok if r["model"] == "student" and r["variant"] == "fp32"), None)
    teacher = next((r for r in ok if r["model"] == "teacher" and r["variant"] == "fp32"), None)
    for r in ok:
        if ref:
            r["speedup"] = ref["p50_ms"] / r["p50_ms"]
            r["accuracy_change"] = r["accuracy"] - ref["accuracy"]
        if teacher and r["size_bytes"]:
            r["size_vs_teacher"] = r["size_bytes"] / teacher["size_bytes"]
    out: Dict[str, Any] = {}
    if ref:
        # chosen on the validation split (the test split is reported, never chosen on), or on test without one
        key = "val_accuracy" if ref.get("val_accuracy") is not None else "accuracy"
        good = [r for r in ok if r.get(key) is not None and r[key] >= ref[key] - max_drop - 1e-12
                and r["model"] != "teacher"]
        best = min(good, key=lambda r: r["p50_ms"])
        out["recommended"] = {"model": best["model"], "variant": best["variant"], "file": best["file"],
                              "chosen_on": "validation" if key == "val_accuracy" else "test"}
        int8 = [r for r in good if r["variant"] in INT8]
        if int8:
            fast = min(int8, key=lambda r: r["p50_ms"])
            out["int8_backend"] = {"model": fast["model"], "variant": fast["variant"]}
    deployable = [r for r in ok if r["model"] != "teacher" and r["size_bytes"]]
    if deployable:
        small = min(deployable, key=lambda r: r["size_bytes"])
        out["smallest"] = {"model": small["model"], "variant": small["variant"], "size_bytes": small["size_bytes"],
                           "file": small["file"]}
    return out


COLUMNS = [("accuracy", "accuracy", "{:.4f}"), ("accuracy_change", "Δ acc", "{:+.4f}"),
           ("val_accuracy", "val acc", "{:.4f}"), ("params", "params", "{:,}"), ("size_bytes", "file KB", None),
           ("p50_ms", "p50 ms", "{:.3f}"), ("p95_ms", "p95 ms", "{:.3f}"),
           ("speedup", "speed-up", "{:.2f}×"), ("throughput", "samples/s", "{:,.0f}"), ("peak_mb", "peak MB", "{:.0f}")]


# a language model: next-token accuracy and perplexity; per decoded token at batch 1; decoded tokens/s
LM_COLUMNS = [("perplexity", "perplexity", "{:.3f}"), ("accuracy", "token acc", "{:.4f}"), COLUMNS[1],
              ("val_accuracy", "val token acc", "{:.4f}")] + COLUMNS[3:5] + [
    ("p50_ms", "ms/token p50", "{:.2f}"), ("p95_ms", "ms/token p95", "{:.2f}"), ("speedup", "speed-up", "{:.2f}×"),
    ("throughput", "tokens/s", "{:,.1f}"), ("prefill_ms", "prefill ms", "{:.1f}"), ("peak_mb", "peak MB", "{:.0f}")]


def bench_columns(out: Dict[str, Any]) -> List[Tuple[str, str, Optional[str]]]:
    """The columns of a bench result: a language model's are per token."""
    return LM_COLUMNS if out.get("language_model", False) else COLUMNS


def speed_note(out: Dict[str, Any]) -> str:
    """How latency and throughput were measured, as bench.md and the report say it."""
    get = lambda k: out.get(k, "?")  # noqa: E731  (the report reads files that may be partial)
    if out.get("language_model", False):
        return (f"greedy decoding with the KV cache, {get('decode_tokens')} new tokens: ms per step at batch 1 over "
                f"{get('latency_runs')} decodes after warm-up (the prefill, measured apart, taken out), tokens/s at "
                f"batch {get('batch')}; token acc is next-token accuracy on the test completions (val token acc on the "
                f"validation ones); peak MB is that of decoding")
    return (f"accuracy on the test split (val acc on the validation split); latency at batch 1 over "
            f"{get('latency_runs')} runs after warm-up, throughput at batch {get('batch')}")


def recommended_on(out: Dict[str, Any]) -> str:
    """Which split the recommendation was chosen on, as bench.md and the report say it (a bench.json written
    before validation accuracy was measured chose on test accuracy)."""
    rec = out.get("recommended")
    chosen = rec.get("chosen_on") if isinstance(rec, dict) else None
    return {"validation": "chosen on validation accuracy",
            "test": "chosen on test accuracy: the data has no validation split"}.get(chosen, "chosen on test accuracy")


def recorded_setting(out: Any, key: str) -> Optional[float]:
    """A numeric setting `distill bench` ran with (its --set included), as bench.json records it; None for a
    bench.json written before the settings were recorded, or a hand-edited one."""
    settings = out.get("settings") if isinstance(out, dict) else None
    value = settings.get(key) if isinstance(settings, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def budget_of(out: Dict[str, Any]) -> str:
    """The accuracy budget a bench chose within, as bench.md and the report say it."""
    drop = recorded_setting(out, "max_accuracy_drop")
    return "the accuracy budget" if drop is None else f"the accuracy budget (bench.max_accuracy_drop={drop:g})"


def format_bench(out: Dict[str, Any]) -> str:
    """A Markdown table (readable as plain text too) with the machine and the recommendations under it."""
    columns = bench_columns(out)
    head = ["model", "variant"] + [c[1] for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in out["results"]:
        if "error" in r:
            note = r["error"] if r["error"].startswith("n/a") else f"failed: {r['error']}"
            cells = [r["model"], r["variant"], note[:110]] + [""] * (len(columns) - 1)
        else:
            cells = [r["model"], r["variant"]] + [
                "" if r.get(k) is None else f"{r[k] / 1024:,.1f}" if fmt is None else fmt.format(r[k])
                for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    m = out["machine"]
    lines += ["", f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
                  f"{out['threads']} thread(s); {speed_note(out)}. Speed-up and Δ acc are against the distilled "
                  f"student (fp32)."]
    budget = f"{budget_of(out)}, {recommended_on(out)}"
    for key, what in (("recommended", f"Recommended (fastest within {budget})"),
                      ("int8_backend", "Fastest int8 variant within the budget"),
                      ("smallest", "Smallest deployable file")):
        if key in out:
            file = out[key].get("file")
            lines.append(f"{what}: {out[key]['model']} {out[key]['variant']}" + (f" ({file})" if file else ""))
    return "\n".join(lines)


def pareto(points: List[Tuple[float, float]]) -> List[int]:
    """Indices of points not beaten by another with lower-or-equal cost and higher-or-equal accuracy."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(results: List[Dict[str, Any]], path: str, lm: bool = False) -> bool:
    """Accuracy against batch-1 latency (a language model's: per decoded token) and against file size, Pareto
    fronts marked. False without matplotlib."""
    from ..plots import pyplot
    plt = pyplot()
    if plt is None:
        return False
    import matplotlib.ticker
    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    latency = "ms per decoded token at batch 1, p50 (log)" if lm else "latency p50 at batch 1 (ms, log)"
    for ax, key, label in ((axes[0], "p50_ms", latency),
                           (axes[1], "size_bytes", "file size (MB, log)")):
        scale = 1 / 2 ** 20 if key == "size_bytes" else 1
        rows = [r for r in ok if r[key]]
        pts = [(r[key] * scale, r["accuracy"]) for r in rows]
        front = pareto(pts)
        for i, (r, (x, y)) in enumerate(zip(rows, pts)):
            on = i in front
            ax.scatter(x, y, s=50 if on else 22, color="C3" if on else "C0", alpha=1 if on else 0.6, zorder=3)
            if on or (r["variant"] == "fp32" and r["model"] in MODELS_OUT):
                ax.annotate(f"{r['model'].replace('compress/', '')} {r['variant']}", (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # the rest are in bench.md
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="C3",
                label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("test next-token accuracy" if lm else "test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("accuracy against latency and size (red, labelled: Pareto-optimal; every point is in bench.md)")
    save_figure(fig, path)
    return True
