"""`distill report RUN_DIR`: one self-contained HTML page about a finished run.

Everything a run folder holds, in one file that opens anywhere without a network: the results table, the
training curves, knowledge retention and gradient consistency over training, the monitor's adjustments,
confusion matrices on the test split, and, when present, the compression bench and the teacher-assistant
chain. Plots are matplotlib PNGs embedded as base64 `data:` URIs and the CSS is inline, so the page can be
mailed or archived as is. The confusion matrices load the already-selected saved models and predict the test
split, as `evaluate` did for metrics.json; nothing is selected on it here.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shlex
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import UserError
from .evaluate import LABELS  # (one set of model labels for the tables and the report)
from .io import read_run_json, write_text
from .logbook import read_run_log
from .plots import epoch_axis, figure_png, heatmap, log_scale, logged, marker, pyplot, series_panel, short
from .roles import SCRATCH, STUDENT, TEACHER, is_assistant
from .tasks.causal_lm import LOWER_IS_BETTER

MAIN_ROLES = (TEACHER, SCRATCH, STUDENT)
NUMBERS_UP_TO = 15  # classes up to which a confusion matrix shows its counts
TICKS_UP_TO = 30  # classes up to which its axes name every class


# ---------------------------------------------------------------- reading the run folder

def role_order(roles: Sequence[str]) -> List[str]:
    """teacher, assistants, scratch and distilled student, then compression fine-tunes and anything else."""
    rank = lambda r: (0 if r == TEACHER else 1 if is_assistant(r) else  # noqa: E731
                      2 if r == SCRATCH else 3 if r == STUDENT else 4, _natural(r))
    return sorted(roles, key=rank)


def _natural(name: str) -> Tuple[Any, ...]:
    tail = name.rsplit("_", 1)[-1]
    return (name.rsplit("_", 1)[0], int(tail)) if tail.isdigit() else (name, 0)


def label(role: str) -> str:
    if role in LABELS:
        return LABELS[role]
    if is_assistant(role):
        return f"assistant {role.split('_', 1)[1]} (distilled)"
    return role.replace("compress_", "compress/", 1)


# ---------------------------------------------------------------- HTML helpers

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = "{:.4f}") -> str:
    """A cell: numbers formatted, mean ± std dicts as such, absent as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, dict) and "mean" in value:
        return f"{fmt(value['mean'], spec)} ± {fmt(value.get('std'), spec)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != value:  # NaN
        return "n/a"
    return spec.format(value)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1,
          numeric_to: Optional[int] = None) -> str:
    """An HTML table; every cell is escaped, columns numeric_from..numeric_to-1 are right-aligned numbers."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    num = lambda i: numeric_from <= i < (len(head) if numeric_to is None else numeric_to)  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td{' class=num' if num(i) else ''}>{esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def img_png(data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


# ---------------------------------------------------------------- sections

def summary_section(recipe: Any, metrics: Dict[str, Any]) -> str:
    from .evaluate import COLUMNS
    rows = role_order([r for r, m in metrics.items() if isinstance(m, dict) and not m.get("skipped")
                       and any(k in m for k, _, _ in COLUMNS)])  # (evaluate.metrics may leave accuracy out)
    cols = [(k, name, f) for k, name, f in COLUMNS if any(k in metrics[r] for r in rows)]
    cols += [(k, name, f) for k, name, f in (("val_accuracy", "val accuracy", "{:.4f}"),
                                             ("selected_epoch", "selected epoch", "{:d}"),
                                             ("train_time_s", "train time s", "{:,.1f}"))
             if any(k in metrics[r] for r in rows)]

    def cell(m: Dict[str, Any], k: str, f: Optional[str]) -> str:
        v = m.get(k)
        if k == "size_bytes" and isinstance(v, (int, float)):
            return f"{v / 1024:,.1f}"
        return fmt(v, f or "{}")
    body = table(["model"] + [c[1] for c in cols], [[label(r)] + [cell(metrics[r], k, f) for k, _, f in cols]
                                                     for r in rows])
    return body + f"<p>{esc(headline(metrics))}</p>" + settings_list(recipe)


# The figure a headline compares, by what the models were measured on: a language model's task metric (exact
# match) or its loss in bits or perplexity, where next-token accuracy says little; else test accuracy.
HEADLINE = (("exact_match", "exact match"), ("bpc", "bits per character"), ("bits_per_byte", "bits per byte"),
            ("perplexity", "perplexity"), ("accuracy", "accuracy"))


def headline(metrics: Dict[str, Any]) -> str:
    """Compression ratio and what the student kept, in one sentence (empty when a model is missing)."""
    t, s, b = (m if isinstance(m, dict) else {} for m in map(metrics.get, (TEACHER, STUDENT, SCRATCH)))
    number = lambda m, k: isinstance(m.get(k), (int, float)) and math.isfinite(m[k])  # noqa: E731  (no "nan%")
    if not (t and s) or not all(isinstance(m.get("params"), (int, float)) for m in (t, s)):
        return ""
    text = (f"The distilled student has {t['params'] / s['params']:.1f}× fewer parameters than the teacher "
            f"({s['params']:,} vs {t['params']:,}")
    if isinstance(t.get("size_bytes"), (int, float)) and s.get("size_bytes"):
        text += f"; its file is {t['size_bytes'] / s['size_bytes']:.1f}× smaller"
    text += ")"
    found = [(k, n) for k, n in HEADLINE if number(t, k) and number(s, k) and (t[k] or k.endswith(LOWER_IS_BETTER))]
    if not found:
        return text + "."
    key, name = found[0]
    if not key.endswith(LOWER_IS_BETTER):
        text += (f" and keeps {100 * s[key] / t[key]:.1f}% of the teacher's test {name} "
                 f"({s[key]:.4f} vs {t[key]:.4f})")
        scratch = f"keeps {100 * b[key] / t[key]:.1f}%" if number(b, key) else None
    else:
        text += f" and its test {name} is {s[key]:.4f} against the teacher's {t[key]:.4f}"
        scratch = f"has {b[key]:.4f}" if number(b, key) else None
    if scratch:
        text += f"; the same student trained without distillation {scratch}"
    elif b.get("skipped"):
        text += "; the student trained without distillation was skipped (baseline: false)"
    return text + "."


def settings_list(recipe: Any) -> str:
    cfg = recipe.cfg
    d, data = cfg["distill"], cfg["data"]
    feats = ", ".join(f"{f.get('teacher')} → {f.get('student')} ({f.get('loss', 'mse')})"
                      for f in d.get("features") or []) or "none"
    items = [("recipe", f"{cfg['name']}" + (f" — {cfg['description']}" if cfg.get("description") else "")),
             ("dataset", data["dataset"] + (f" ({data['path']})" if data.get("path") else "")),
             ("teacher / student", f"{_model(cfg['teacher'])} / {_model(cfg['student'])}"),
             ("distillation", _method(d) + f", T = {d.get('temperature')}, alpha = {d.get('alpha')}"),
             ("features", feats)]
    extra = {k: v for k, v in ((k, _set(d.get(k))) for k in ("layers", "schedule", "assistants", "sample_weight"))
             if v}
    layers = extra.get("layers") or {}
    if not (layers.get("hidden") or layers.get("attention")):  # map and weights alone: no layer loss is on
        extra.pop("layers", None)
    if extra:
        items.append(("more distillation settings", json.dumps(extra)))
    data_kd = _data_distillation(d["data"])
    if data_kd:
        items.append(("data distillation", ", ".join(f"{k} = {v}" for k, v in data_kd.items())))
    mon = cfg.get("monitor") or {}
    if mon.get("retention_min") is not None:
        items.append(("monitor", f"retention_min = {mon['retention_min']}, action = {mon.get('action')}"))
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def _data_distillation(dd: Dict[str, Any]) -> Dict[str, Any]:
    """distill.data's settings that are on (token masking, augmented copies, unlabelled texts), with the ones
    that say how much of each."""
    from .recipe_checks import not_default
    from .recipe_schema import SCHEMA
    schema = SCHEMA["distill"]["data"]
    on = set(not_default(dd, schema))
    on |= {"mask_fraction", "teacher_sees"} if dd["mask"] else set()
    on |= {"word_prob"} if dd["eda"] or dd["substitute"] else set()
    on |= {"neighbours"} if dd["substitute"] else set()
    return {k: dd[k] for k in schema if k in on}


def _method(d: Dict[str, Any]) -> str:
    """The logit term, with its own settings (dkd: {...}, jsd: {beta}) and how the teacher's outputs reach it."""
    method = d.get("method", "kd")
    own = {"skew_kl": "skew", "skew_reverse_kl": "skew"}.get(method, method)
    said = [method + (f" {json.dumps(d[own])}" if isinstance(d.get(own), dict) else "")]
    if d.get("logit_standardize"):
        said.append("logits standardised")
    if d.get("topk"):
        said.append(f"top-{d['topk']} cache")
    on_policy, seq = d.get("on_policy") or {}, d.get("sequence_kd") or {}
    if on_policy.get("fraction"):
        said.append(f"on-policy {json.dumps(on_policy)}")
    if seq.get("windows") or seq.get("samples"):
        said.append(f"sequence-level KD {json.dumps({k: v for k, v in seq.items() if v is not None})}")
    return ", ".join(said)


def _model(m: Dict[str, Any]) -> str:
    """A model section in a few words: registry name and args, Hugging Face folder, or derived from the teacher."""
    if m.get("from_teacher"):
        ft = m["from_teacher"]
        return f"teacher's layers {ft.get('layers')}" if ft.get("layers") is not None else \
            f"every {ft.get('keep_every')}th teacher layer"
    if m.get("hf_config"):
        return f"fresh transformer {json.dumps(m['hf_config'])}"
    name = m.get("hf") or m.get("model") or m.get("arch") or m.get("checkpoint") or "?"
    return f"{name} {json.dumps(m['args'])}" if m.get("args") else str(name)


def _set(value: Any) -> Any:
    """What of a setting is switched on: dict entries other than the off/default values, recursively."""
    if isinstance(value, dict):
        kept = {k: _set(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    return None if value in ("none", "constant", [], None) else value


def curves_section(plt: Any, epochs: Dict[str, List[Dict[str, Any]]], steps: Dict[str, List[Dict[str, Any]]]
                   ) -> str:
    roles = role_order(list(epochs))
    if not roles:
        return note("log.jsonl holds no epoch records.")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, role in enumerate(roles):
        recs, c = epochs[role], f"C{i % 10}"
        x = [r["epoch"] for r in recs]
        axes[0].plot(x, [r.get("loss_total", float("nan")) for r in recs], color=c, marker=marker(x), ms=3,
                     label=label(role))
        if any(r.get("val_accuracy") is not None for r in recs):  # (none without a validation split)
            axes[1].plot(x, [r.get("val_accuracy", float("nan")) for r in recs], color=c, marker=marker(x), ms=3,
                         label=f"{label(role)} val")
        if any("train_accuracy" in r for r in recs):
            axes[1].plot(x, [r.get("train_accuracy", float("nan")) for r in recs], color=c, ls="--", lw=1,
                         marker=marker(x) and "x", ms=3, label=f"{label(role)} train")  # (one epoch: a point)
    axes[0].set_title(f"training loss per epoch (each model's own objective{log_scale(axes[0])})", fontsize=10)
    axes[1].set_title("accuracy per epoch (solid: validation, dashed: train)", fontsize=10)
    for ax in axes:
        epoch_axis(ax)
        ax.legend(fontsize=7, loc="best")
    out = img_png(figure_png(fig), "training curves")
    student = epochs.get("student", [])
    parts = sorted({k for r in student for k in r if k.startswith("loss_") and k != "loss_total"})
    step_roles = [r for r in role_order(list(steps)) if steps[r]]
    if parts or step_roles:
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), squeeze=False)
        ax = axes[0][0]
        if parts:
            x = [r["epoch"] for r in student]
            for k in ["loss_total"] + parts:
                ax.plot(x, [r.get(k, float("nan")) for r in student], marker=marker(x), ms=3, label=k[5:])
            ax.set_title(f"distilled student: loss terms per epoch (total and parts{log_scale(ax)})", fontsize=10)
            ax.legend(fontsize=7)
            epoch_axis(ax)
        else:
            ax.axis("off")
        ax = axes[0][1]
        for i, role in enumerate(roles):
            recs = steps.get(role) or []
            if recs:
                ax.plot([r["step"] for r in recs], [r.get("loss_total", float("nan")) for r in recs],
                        color=f"C{i % 10}", lw=1.2, label=label(role), marker=marker(recs), ms=3)
        if step_roles:
            ax.set_title(f"training loss every few steps (mean since the previous record{log_scale(ax)})",
                         fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            ax.axis("off")
        out += img_png(figure_png(fig), "loss terms and step-level loss")
    return out


def retention_section(plt: Any, student: List[Dict[str, Any]]) -> str:
    keys = {p: sorted({k for r in student for k in r if k.startswith(p)}) for p in ("retention_cka/", "retention_cos/")}
    keys = {p: ks for p, ks in keys.items() if ks}
    if not keys:
        return note("This run logged no retention (retention_cka/*, retention_cos/*): no distilled student epochs "
                    "with the monitor's measurements in log.jsonl.")
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 3.8), squeeze=False)
    titles = {"retention_cka/": "linear CKA, teacher vs student (1 = same representation)",
              "retention_cos/": "cosine, teacher vs projected student features"}
    for ax, (p, ks) in zip(axes[0], keys.items()):
        series_panel(ax, student, ks, titles[p], p, vmin=0.0 if p == "retention_cka/" else -1.0, vmax=1.0)
    return (img_png(figure_png(fig), "knowledge retention per layer")
            + "<p>Measured on a fixed validation probe at the end of each epoch that passes a multiple of "
              "<code>monitor.measure_every</code> steps, and of the last (every epoch with "
              "<code>monitor.retention_min</code>); one line per teacher → student layer "
              "pair (and the logits).</p>")


def gradient_section(plt: Any, student: List[Dict[str, Any]], steps: List[Dict[str, Any]]) -> str:
    modules = sorted({k for r in student for k in r if k.startswith("grad_kd_ce_cos/")})
    lines = [k for k in ("grad_kd_ce_cos", "grad_input_cos") if any(k in r for r in student)]
    if not modules and not lines:
        return note("This run logged no gradient consistency (grad_kd_ce_cos, grad_input_cos).")
    panels = (1 if modules else 0) + (1 if lines else 0)
    height = min(12.0, max(3.8, 0.22 * len(modules) + 1.5))  # room for every module's name
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, height), squeeze=False)
    i = 0
    if modules:
        ax = axes[0][0]
        heatmap(ax, student, modules, [short(m.split("/", 1)[1], 40) for m in modules], "RdBu", -1, 1)
        ax.set_title("cos(∇KD, ∇CE) per student module (blue: agree, red: oppose)", fontsize=10)
        i = 1
    if lines:
        ax = axes[0][i]
        for j, k in enumerate(lines):
            xs, ys = logged(student, k)
            ax.plot(xs, ys, marker=marker(xs), ms=3, color=f"C{j}", label=k)
        ax.axhline(0, color="gray", lw=0.8)
        epoch_axis(ax)
        ax.legend(fontsize=8)
        ax.set_title("whole-model gradient cosines per epoch", fontsize=10)
    return (img_png(figure_png(fig), "gradient consistency")
            + "<p>grad_kd_ce_cos: cosine between the parameter gradients of the KD term and of the hard-label term "
              "(below zero the teacher pulls against the labels); grad_input_cos: cosine between the teacher's and "
              "the student's input gradients.</p>")


def adjustments_section(epochs: Dict[str, List[Dict[str, Any]]]) -> str:
    rows = []
    for role in role_order(list(epochs)):
        for r in epochs[role]:
            adj = r.get("adjusted")
            if isinstance(adj, dict) and adj:
                change = "; ".join(f"{k}: {fmt(v[0], '{:.4g}')} → {fmt(v[1], '{:.4g}')}" if isinstance(v, list)
                                   and len(v) == 2 else f"{k}: {v}" for k, v in adj.items())
                rows.append([label(role), r["epoch"], fmt(r.get("retention_watched")), change])
    if not rows:
        return note("The monitor made no adjustments in this run (monitor.retention_min unset, or never crossed).")
    return table(["model", "epoch", "watched retention", "change (before → after)"], rows, numeric_to=3)


def generations_section(metrics: Dict[str, Any]) -> str:
    """The same test prompts completed greedily by the teacher and each student, beside the reference (the
    samples `evaluate.exact_match` keeps in metrics.json)."""
    roles = [r for r in MAIN_ROLES if isinstance(metrics.get(r), dict) and metrics[r].get("samples")]
    if not roles:
        return note("Not available: no samples in metrics.json (set evaluate.exact_match.rows > 0 for prompt/"
                    "completion data)")
    first = metrics[roles[0]]["samples"]
    head = ["prompt", "reference", *(LABELS.get(r, r) for r in roles)]
    rows = [[_tail(s["prompt"], 120), s["reference"], *(metrics[r]["samples"][i]["completion"] if
                                                         i < len(metrics[r]["samples"]) else "" for r in roles)]
            for i, s in enumerate(first)]
    ems = ", ".join(f"{LABELS.get(r, r)} {metrics[r]['exact_match']:.2f}" for r in roles
                    if isinstance(metrics[r].get("exact_match"), (int, float)))
    # (as written: a worked answer's lines, and the space before an answer that exact match may count)
    return f'<div class="texts">{table(head, rows, numeric_from=len(head))}</div>' + note(
        f"Greedy completions of the first test prompts. Exact match on the test prompts scored: {ems}.")


def _tail(text: str, n: int) -> str:
    """The last `n` characters of `text`, marked as cut when it is longer."""
    return text if len(text) <= n else "…" + text[-n:]


def confusion_section(plt: Any, recipe: Any, folder: str) -> str:
    """Load the saved models (the baseline when the run has one) and count their test-split predictions per
    true class."""
    import numpy as np
    from .data import load_data
    from .pipeline.artifacts import load_model_at, require_same_data, require_saved
    from .engine.inference import predict
    roles = [r for r in MAIN_ROLES if r != SCRATCH or recipe.cfg["baseline"]]
    try:
        data = load_data(recipe.cfg["data"])
        for r in roles:
            require_same_data(folder, r, data)
        models = [(r, load_model_at(require_saved(folder, r), r)) for r in roles]
    except UserError as e:
        return note(f"Not available: {e}")
    k, y = data.num_classes, data.y_test.numpy()
    bs = recipe.cfg["data"].get("eval_batch_size", 512)
    fig, axes = plt.subplots(1, len(roles), figsize=(5 * len(roles), 5.2 if k <= TICKS_UP_TO else 4.6))
    names = [short(str(n), 14).replace("$", r"\$") for n in data.class_names]  # a $ pair would be mathtext
    for ax, (role, model) in zip(axes, models):
        pred = predict(model, data.x_test, bs).argmax(1).numpy()
        cm = np.zeros((k, k), dtype=int)
        np.add.at(cm, (y, pred), 1)
        rate = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # colour by recall, so rare classes show too
        ax.imshow(rate, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if k <= NUMBERS_UP_TO:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8 if k <= 10 else 6,
                                color="white" if rate[i, j] > 0.5 else "black")
        if k <= TICKS_UP_TO:
            ax.set_xticks(range(k))
            ax.set_yticks(range(k))
            ax.set_xticklabels(names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=7)
            ax.set_yticklabels(names, fontsize=7)
        acc = float((pred == y).mean())
        ax.set_title(f"{label(role)}: accuracy {acc:.4f}", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    caption = (f"Test split, {len(y):,} samples, {k} classes; colour is the fraction of each true class "
               f"(row), {'numbers are counts' if k <= NUMBERS_UP_TO else 'counts omitted for this many classes'}.")
    return img_png(figure_png(fig), "confusion matrices") + f"<p>{esc(caption)}</p>"


def compression_section(folder: str) -> str:
    from .compress.bench import bench_columns, budget_of, compressed_out_of_date, recommended_on, speed_note
    out, old_chain = "", compressed_out_of_date(folder)  # (its models' bench rows are out of date too)
    comp = read_run_json(os.path.join(folder, "compress", "compress.json"))
    if isinstance(comp, dict) and isinstance(comp.get("models"), list) and comp["models"]:
        rows = []
        for r in (r for r in comp["models"] if isinstance(r, dict)):  # (not what distill writes: left out)
            info = {k: v for k, v in r.items() if k not in ("name", "path", "params", "size_bytes", "val_accuracy")}
            rows.append([r.get("name"), fmt(r.get("params"), "{:,}"),
                         fmt(r["size_bytes"] / 1024, "{:,.1f}") if isinstance(r.get("size_bytes"), (int, float))
                         else "–", fmt(r.get("val_accuracy")), short(json.dumps(info), 160)])
        # (details: the step's own record, e.g. what was removed and the fine-tune's time)
        steps = " → ".join(map(str, comp.get("steps", [])))
        out += (f"<h3>compress ({esc(comp.get('source', 'student'))}: {esc(steps)})</h3>"
                + table(["step", "params", "file KB", "val accuracy", "details"], rows, numeric_to=4))
        if comp.get("finished") is False:  # (a record written before the flag was: not said)
            out += note(f"This compress stopped before its last step; continue with "
                        f"`distill compress {shlex.quote(folder)} --resume`.")
        if old_chain:
            out += note(f"Out of date: these models were {old_chain}; run `distill compress {shlex.quote(folder)}` "
                        f"again.")
    bench = read_run_json(os.path.join(folder, "bench", "bench.json"))
    if isinstance(bench, dict) and isinstance(bench.get("results"), list) and bench["results"]:
        from .compress.bench import is_stale, model_versions
        columns = bench_columns(bench)  # (a language model's are per token)
        versions = model_versions(folder)
        stale = [isinstance(r, dict) and (is_stale(r, versions) or bool(old_chain) and str(r.get("model")).startswith(
            "compress/")) for r in bench["results"]]
        pareto = os.path.join(folder, "bench", "pareto.png")
        if os.path.isfile(pareto):
            with open(pareto, "rb") as fh:
                out += "<h3>bench</h3>" + img_png(fh.read(), "accuracy against latency and size")
        else:
            out += "<h3>bench</h3>"
        rows = []
        for r, old in zip(bench["results"], stale):
            if not isinstance(r, dict):
                continue
            model = f"{r.get('model')} †" if old else r.get("model")
            if "error" in r:
                rows.append([model, r.get("variant"), short(str(r["error"]), 110)]
                            + [""] * (len(columns) - 1))
            else:
                rows.append([model, r.get("variant")] + [
                    "–" if r.get(k) is None else fmt(r[k] / 1024, "{:,.1f}") if f is None else fmt(r[k], f)
                    for k, _, f in columns])
        out += table(["model", "variant"] + [c[1] for c in columns], rows, numeric_from=2)
        if any(stale):
            out += note("† measured on an earlier version of the model, which was trained or compressed again "
                        "since (or is gone): these rows, the plot and the recommendation are out of date; run "
                        f"`distill bench {shlex.quote(folder)}` again.")
        m = bench.get("machine") or {}
        out += note(f"Machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {m.get('torch', '?')}, "
                    f"{bench.get('threads', '?')} thread(s); {speed_note(bench)}. Speed-up and Δ acc are against "
                    f"the distilled student (fp32).")
        rec = bench.get("recommended")
        if isinstance(rec, dict):
            out += f"<p>Recommended (fastest within {esc(budget_of(bench))}, {esc(recommended_on(bench))}): " \
                   f"<b>{esc(rec.get('model'))} {esc(rec.get('variant'))}</b></p>"
    again = shlex.quote(folder)
    return out or note(f"No compression results: run `distill compress {again}` and `distill bench {again}`.")


def chain_section(plt: Any, chain: Dict[str, Any]) -> str:
    gens = [g for g in chain.get("generations", []) if isinstance(g, dict)]
    if not gens:
        return note("chain.json lists no generations.")
    out = table(["generation", "params", "val accuracy", "test accuracy", "retention CKA vs teacher"],
                [[label(str(g.get("name"))), fmt(g.get("params"), "{:,}"), fmt(g.get("val_accuracy")),
                  fmt(g.get("test_accuracy")), fmt(g.get("retention_cka"))] for g in gens])
    decay = [d for d in chain.get("decay", []) if isinstance(d, dict)]
    if decay:
        out += "<h3>decay between neighbours</h3>" + table(
            ["from → to", "accuracy drop (points)", "decay rate", "retention drop"],
            [[f"{label(str(d.get('from')))} → {label(str(d.get('to')))}", fmt(d.get("accuracy_drop"), "{:.2f}"),
              fmt(d.get("decay_rate"), "{:.4f}"), fmt(d.get("retention_drop"))] for d in decay])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = list(range(len(gens)))
    for key, name in (("test_accuracy", "test accuracy"), ("retention_cka", "retention (CKA vs teacher)")):
        ax.plot(x, [g.get(key) if isinstance(g.get(key), (int, float)) else float("nan") for g in gens],
                marker="o", label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([short(label(str(g.get("name"))), 22) for g in gens], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy and retention per generation", fontsize=10)
    return out + img_png(figure_png(fig), "accuracy and retention per generation")


# ---------------------------------------------------------------- the page

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1220px;
padding:16px 28px 48px;color:#1d2327;line-height:1.45;background:#fff}
h1{font-size:1.6em;margin:.4em 0 .1em}h2{font-size:1.25em;border-bottom:2px solid #dde3e8;padding-bottom:3px;
margin-top:1.8em}h3{font-size:1.02em;margin:1.2em 0 .4em}
nav{font-size:.9em;margin:.4em 0 1em}nav a{margin-right:14px;color:#2463a6;text-decoration:none}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{padding:4px 10px;border-bottom:1px solid #e3e7ea;
text-align:left;vertical-align:top}th{background:#f3f6f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}img{max-width:100%;height:auto;display:block;margin:.6em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:3px 16px;font-size:.92em}dt{font-weight:600;color:#444}
dd{margin:0;word-break:break-word}.note{color:#666;font-style:italic}.sub{color:#555;margin:0}
.texts td{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
"""


def build_report(folder: str) -> str:
    """The whole page as a string."""
    from .recipe import Recipe
    from .pipeline.artifacts import require_run
    require_run(folder, "report")
    plt = pyplot()
    if plt is None:  # (one line, before any work)
        raise UserError("distill report: matplotlib is not installed; pip install -e \".[plot]\"")
    recipe = Recipe.load(os.path.join(folder, "recipe.yaml"))
    metrics = read_run_json(os.path.join(folder, "metrics.json"))
    if not isinstance(metrics, dict):
        raise UserError(f"{os.path.join(folder, 'metrics.json')}: not a metrics object; run `distill run` again")
    epochs, steps = read_run_log(folder, recipe.cfg)
    student = epochs.get("student", [])
    parts: List[Tuple[str, str, Callable[[], str]]] = [
        ("summary", "Summary", lambda: summary_section(recipe, metrics)),
        ("curves", "Training curves", lambda: curves_section(plt, epochs, steps)),
        ("retention", "Knowledge retention", lambda: retention_section(plt, student)),
        ("gradients", "Gradient consistency", lambda: gradient_section(plt, student, steps.get("student", []))),
        ("monitor", "Monitor adjustments", lambda: adjustments_section(epochs)),
        ("confusion", "Confusion matrices", lambda: confusion_section(plt, recipe, folder))]
    from .recipe import LM_DATASETS
    if recipe.cfg["data"]["dataset"] in LM_DATASETS:  # (next tokens have no confusion matrix: their text instead)
        parts[-1] = ("generations", "Sample generations", lambda: generations_section(metrics))
    if os.path.isfile(os.path.join(folder, "bench", "bench.json")) or \
            os.path.isfile(os.path.join(folder, "compress", "compress.json")):
        parts.append(("compression", "Compression", lambda: compression_section(folder)))
    chain = read_run_json(os.path.join(folder, "chain.json"))
    if isinstance(chain, dict):
        parts.append(("chain", "Teacher-assistant chain", lambda: chain_section(plt, chain)))
    from . import __version__
    title = f"distill report: {recipe.cfg['name']}"
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in parts)
    body = "\n".join(section(a, t, make()) for a, t, make in parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=sub>run folder {esc(os.path.abspath(folder))} · distill {esc(__version__)}"
            f"</p><nav>{nav}</nav>\n{body}\n</body></html>\n")


def report(folder: str, out: Optional[str] = None) -> str:
    """Write the report (atomically) and return its path."""
    page = build_report(folder)
    path = out or os.path.join(folder, "report.html")
    write_text(path, page)
    return path
