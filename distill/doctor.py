"""`distill doctor RUN_DIR`: diagnose a finished run from what it wrote.

A distillation run can "work" (every stage finishes) and still be a poor use of the teacher: a teacher
no better than the student, soft labels with no dark knowledge in them, a student too small to learn from
this teacher, a loss that spikes, a model that memorises its training set, an int8 variant that loses
accuracy. Each rule below reads the run's log.jsonl, metrics.json, recipe.yaml and, when present,
bench/bench.json and chain.json; it loads the saved models and the data only for a number the logs lack.
A rule either returns findings -- the numbers that triggered it, the threshold they crossed, and the recipe
key to change -- or says why it was skipped (the data it needs is absent). Diagnoses are not errors: the
command exits 0 either way; the findings also go to RUN_DIR/doctor.json.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .errors import UserError
from .io import read_run_json, write_json
from .logbook import read_run_log
from .recipe import LM_DATASETS
from .roles import MODELS_OUT, SCRATCH, STUDENT, TEACHER, is_assistant, recipe_section

# Every threshold the rules use, in one place. Accuracies are fractions (0.01 = one point).
THRESHOLDS: Dict[str, float] = {
    # weak_teacher: the teacher must beat the scratch student by more than this on the test split. One
    # point is about the noise of a few hundred test samples; a teacher inside it has nothing to teach
    # beyond the labels (the premise of KD, Hinton et al. 2015, is a teacher better than the student).
    "teacher_margin": 0.01,
    # overconfident_soft_labels: mean entropy of softmax(logits / T) on the validation split, as a fraction
    # of log(C) (1 = uniform). Under 0.1 the softened targets are nearly one-hot: they carry almost no
    # similarity between classes ("dark knowledge"), and KD reduces to training on hard labels.
    "entropy_min": 0.1,
    # capacity_gap / student_too_small: distillation "gains little" under this gain over scratch ...
    "kd_gain_min": 0.01,
    # ... and a student is "far below" a teacher more than this many accuracy points under it.
    "teacher_gap": 0.10,
    # capacity_gap: teacher/student parameter ratio from which a gap is likely. Mirzadeh et al. (2020, the
    # teacher-assistant paper) find the student's gain falling once the teacher is roughly 10x larger.
    "param_ratio": 10.0,
    # unstable_loss: a step window's max batch loss above spike_ratio x the running median of the mean
    # loss over the previous median_window step records, and above it by spike_excess x log(C) nats (so a
    # near-zero loss doubling is not a spike), ignoring the first warmup_records records (the fast initial
    # fall of the loss makes any early median meaningless).
    "spike_ratio": 3.0,
    "spike_excess": 0.25,
    "median_window": 10,
    "warmup_records": 5,
    # ... and in those first records, a max batch loss above blowup_ratio x the first record's loss (the
    # untrained model's, which training only lowers) is a blow-up: a learning rate far too high.
    "blowup_ratio": 10.0,
    # unstable_loss: validation accuracy falling this much from one epoch to the next (after the first
    # warmup_epochs) is oscillation, not noise: with a settled learning rate it moves a point or two.
    "val_drop": 0.15,
    "warmup_epochs": 2,
    # overfitting: last-epoch training accuracy minus validation accuracy above this. A few points is the
    # usual generalisation gap of a fitted model; ten means it memorises the training set.
    "overfit_gap": 0.10,
    # overfitting: validation loss at the end at least rise_factor x its minimum, reached rise_epochs or
    # more epochs before the end, while the training loss kept falling.
    "rise_factor": 1.5,
    "rise_epochs": 5,
    # student_too_small: the student cannot fit the training data: its training accuracy this far below
    # the teacher's (underfitting, a capacity limit rather than a transfer problem).
    "underfit_gap": 0.10,
    # unstable_loss (and, for that role, not overfitting or student_too_small): a last-epoch training
    # accuracy within this of chance (1/C) is a model that learnt nothing.
    "chance_margin": 0.05,
    # ... after at least this many epochs (a shorter run has not had the time to learn); overfitting too
    # waits for them (a model two epochs in is still fitting, and its gap is noise).
    "min_epochs": 3,
}
TH = THRESHOLDS  # (short name for the rules below)

ROLES = MODELS_OUT
DYNAMIC_OF = {"static": "dynamic", "onnx_static": "onnx_dynamic", "pt2e": "dynamic"}  # static -> its dynamic pair


class Skip(Exception):
    """A rule cannot run on this run folder: the message says what it needs."""


def finding(rule: str, severity: str, message: str, evidence: Dict[str, Any], suggestion: str) -> Dict[str, Any]:
    return {"rule": rule, "severity": severity, "message": message, "evidence": evidence, "suggestion": suggestion}


# ---------------------------------------------------------------- the run, as the rules see it

class RunView:
    """The files of a run folder, read once; the data and models are loaded only when a rule asks."""

    def __init__(self, folder: str) -> None:
        from .recipe import Recipe
        from .pipeline.artifacts import require_run
        require_run(folder, "doctor")
        self.folder = folder
        self.metrics = self._json("metrics.json")
        self.cfg = Recipe.load(self.path("recipe.yaml")).cfg
        self.stages = self._json("stages.json") or {}
        self.bench = self._json(os.path.join("bench", "bench.json"))
        self.chain = self._json("chain.json")
        self.epochs, self.steps = read_run_log(folder, self.cfg)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _json(self, name: str) -> Any:
        return read_run_json(self.path(name))

    def role_metrics(self, role: str) -> Dict[str, Any]:
        m = (self.metrics or {}).get(role)
        return m if isinstance(m, dict) else {}  # (absent, or not what evaluate writes: nothing to read)

    def accuracy(self, role: str) -> float:
        """Test accuracy of `role` from metrics.json, or Skip."""
        m = self.role_metrics(role)
        if m.get("skipped"):
            raise Skip(f"the run skipped {role} (baseline: false), so there is nothing to compare against")
        if m.get("accuracy") is None:
            raise Skip(f"metrics.json has no test accuracy for {role}")
        return float(m["accuracy"])

    def judged(self, *roles: str) -> Tuple[Dict[str, float], str]:
        """({role: accuracy}, the split's name): on the validation split where every one of `roles` was measured
        on it, else on the test split. The rules advise changes to the recipe, and advice drawn from test
        accuracy, followed, tunes the recipe on the test split."""
        test = {r: self.accuracy(r) for r in roles}  # (a role skipped or not evaluated: Skip)
        val = {r: self.role_metrics(r).get("val_accuracy") for r in roles}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val.values()):
            return {r: float(v) for r, v in val.items()}, "validation"
        return test, "test"

    def measure(self, split: str) -> str:
        """What an accuracy of `split` is, as the findings say it: of a language model, the share of next tokens
        predicted (the rules' thresholds are in accuracy points; its bits and perplexity are in the report)."""
        return f"{split} next-token accuracy" if self.cfg["data"]["dataset"] in LM_DATASETS else f"{split} accuracy"

    def bench_setting(self, key: str) -> Any:
        """A bench setting as `distill bench` ran with it (its --set included), from bench.json; the recipe's
        for a bench.json written before the settings were recorded."""
        from .compress.bench import recorded_setting
        value = recorded_setting(self.bench, key)
        return self.cfg["bench"][key] if value is None else value

    def params(self, role: str) -> int:
        m = self.role_metrics(role)
        if not m.get("params"):
            raise Skip(f"metrics.json has no parameter count for {role}")
        return int(m["params"])

    @cached_property
    def data(self):
        from .data import load_data
        return load_data(self.cfg["data"])

    def model(self, role: str):
        from .pipeline.artifacts import load_model_at, require_same_data, require_saved
        try:
            path = require_saved(self.folder, role)
        except UserError:
            raise Skip(f"the saved {role} model is missing") from None
        from .data import load_data
        from .pipeline.rundir import data_cfg_for
        own = data_cfg_for(self.cfg, role)  # (a student of another tokenizer reads its own tokens)
        try:
            require_same_data(self.folder, role, self.data if own == self.cfg["data"] else load_data(own))
        except UserError:
            raise Skip(f"the {role} was trained on other data than the recipe gives now") from None
        try:
            return load_model_at(path, role)
        except UserError as e:  # (a file damaged since: the other rules still run)
            raise Skip(f"the saved {role} model does not load ({e})") from None

    def train_accuracy(self, roles: Tuple[str, ...]) -> Tuple[Dict[str, float], str]:
        """Training accuracy of each role, from one source for all: the last epoch's `train_accuracy` in the
        log when every role has it, else the selected model measured on the training split (eval mode)."""
        last = {r: (self.epochs.get(r) or [{}])[-1].get("train_accuracy") for r in roles}
        if all(v is not None for v in last.values()):
            return {r: float(v) for r, v in last.items()}, "log: last epoch (train mode, running over the epoch)"
        from dataclasses import replace
        from .tasks import task_for
        train = replace(self.data, x_val=self.data.x_train, y_val=self.data.y_train)  # (scored as validation is:
        bs = self.cfg["data"]["eval_batch_size"]  # per class, or per predicted token of a language model)
        return ({r: task_for(train).validate(self.model(r), train, bs)["val_accuracy"] for r in roles},
                "computed: selected model on the training split")

    @cached_property
    def num_classes(self) -> int:
        """From the teacher file's header when it has one (no data to load), else from the data."""
        from .io import load_meta
        path = self.path("teacher.safetensors")
        try:
            n = load_meta(path).get("num_classes") if os.path.isfile(path) else None
        except UserError:  # (a file damaged since: the data says it as well)
            n = None
        return int(n) if n else self.data.num_classes


def lr_key(role: str) -> str:
    """The recipe key of a role's learning rate."""
    if role == "teacher":
        return "teacher.train.optimizer.lr"
    return "compress.lr" if role.startswith("compress_") else "student.train.optimizer.lr"


def role_train(cfg: Dict[str, Any], role: str) -> Dict[str, Any]:
    """The resolved train section a role trained with (assistants and compress fine-tunes use the student's)."""
    return cfg["teacher" if role == "teacher" else "student"]["train"]


def _short(v: Any) -> Any:
    """Floats to 4 significant digits (evidence is for reading), inside dicts too."""
    if isinstance(v, dict):
        return {k: _short(x) for k, x in v.items()}
    return float(f"{v:.4g}") if isinstance(v, float) else v


# ---------------------------------------------------------------- the rules

def weak_teacher(run: RunView) -> List[Dict[str, Any]]:
    """The teacher is no better than the student trained without it: it has nothing to teach."""
    acc, split = run.judged(TEACHER, SCRATCH)
    teacher, scratch = acc[TEACHER], acc[SCRATCH]
    if teacher > scratch + TH["teacher_margin"]:
        return []
    if did_not_learn(run, TEACHER) is not None:  # (a bigger or regularised teacher would not mend that)
        raise Skip("the teacher learnt nothing (see unstable_loss): a failed training says nothing of its size")
    tm = run.metrics["teacher"]
    epochs = run.cfg["teacher"]["train"]["epochs"]
    loaded = (run.stages.get("teacher") or {}).get("loaded_from")
    ev = {"split": split, "teacher_accuracy": teacher, "scratch_accuracy": scratch,
          "teacher_margin": TH["teacher_margin"], "teacher_test_accuracy": tm.get("accuracy"),
          "scratch_test_accuracy": run.metrics[SCRATCH].get("accuracy"),
          # (a loaded teacher was not trained here: the recipe's epochs say nothing of it)
          "teacher_epochs": None if loaded else epochs, "teacher_selected_epoch": tm.get("selected_epoch"),
          "teacher_loaded_from": loaded}
    from .recipe import is_text
    bigger = "teacher.hf: a larger model" if is_text(run.cfg, "teacher") else "teacher.model / teacher.args"
    if loaded:
        fix = f"the teacher was loaded from {loaded}: give a better-trained teacher.checkpoint, or train one"
    elif epochs >= 4 and tm.get("selected_epoch") and tm["selected_epoch"] <= epochs / 2:
        wd = run.cfg["teacher"]["train"]["optimizer"]["weight_decay"]
        fix = (f"its validation accuracy peaked at epoch {tm['selected_epoch']} of {epochs}, so longer training "
               f"will not help: use a bigger teacher ({bigger}) or regularise it "
               f"(--set teacher.train.optimizer.weight_decay={wd * 10 if wd else 1e-4:g}, now {wd:g})")
    else:  # still improving at the end of its epochs
        fix = (f"train the teacher longer (--set teacher.train.epochs={epochs * 2}, now {epochs}; check "
               f"teacher.train.optimizer.lr={run.cfg['teacher']['train']['optimizer']['lr']}) or use a bigger "
               f"teacher ({bigger})")
    return [finding("weak_teacher", "high",
                    f"the teacher's {run.measure(split)} {teacher:.4f} is not above the scratch student's "
                    f"{scratch:.4f} by more than teacher_margin={TH['teacher_margin']}: it has little to teach",
                    ev, fix)]


LM_ROWS = 8  # validation sequences a language model's soft labels are measured on (their logits are held whole)


def normalised_entropy(logits: torch.Tensor, temperature: float) -> float:
    """Mean entropy of softmax(logits / T) over the classes (the last dimension: a language model's vocabulary),
    divided by log(C) (0: one-hot, 1: uniform), over every sample (position)."""
    flat = logits.reshape(-1, logits.shape[-1])
    total = 0.0
    for rows in flat.split(256):  # (in pieces: a language model's positions x vocabulary, in float64)
        logp = torch.log_softmax(rows.double() / temperature, -1)
        total += float(-(logp.exp() * logp).sum())
    return total / max(len(flat), 1) / math.log(logits.shape[-1])


def temperature_for(logits: torch.Tensor, target: float, start: float) -> float:
    """The smallest T (to 0.1, rounded up) at which the mean normalised entropy reaches `target`. Entropy
    rises monotonically with T towards 1 (uniform), so bisection finds it."""
    lo, hi = start, max(start, 1.0)
    while normalised_entropy(logits, hi) < target and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if normalised_entropy(logits, mid) < target else (lo, mid)
    return math.ceil(hi * 10) / 10


def overconfident_soft_labels(run: RunView) -> List[Dict[str, Any]]:
    """The teacher's softened outputs are nearly one-hot: the soft labels carry almost no dark knowledge."""
    from .engine.inference import predict
    if not len(run.data.x_val):
        raise Skip("the run has no validation split (data.val_fraction: 0) to measure the soft labels on")
    teacher = run.model("teacher")
    # (a schedule moves T: the softest soft labels the run distilled on, at the largest T, are what is judged)
    d = run.cfg["distill"]
    scheduled = d["schedule"]["temperature"] != "constant" and d["schedule"].get("temperature_end") is not None \
        and d["schedule"]["temperature_end"] > d["temperature"]
    t = float(d["schedule"]["temperature_end"] if scheduled else d["temperature"])
    key = "distill.schedule.temperature_end" if scheduled else "distill.temperature"
    x, mask = run.data.x_val, None
    if run.data.task == "causal_lm":  # (per predicted token, of the first sequences: batch x length x vocabulary)
        x, mask = x[:LM_ROWS], run.data.y_val[:LM_ROWS] >= 0
    logits = predict(teacher, x, run.cfg["data"]["eval_batch_size"])
    samples = int(logits.shape[0])
    if mask is not None:  # (once: the positions with a target, (P, V))
        logits = logits[mask.to(logits.device)]
    h = normalised_entropy(logits, t)
    if h >= TH["entropy_min"]:
        return []
    better = temperature_for(logits, TH["entropy_min"], t)
    ev = {"temperature": t, "normalised_entropy": h, "entropy_min": TH["entropy_min"], "split": "validation",
          "samples": samples, **({"positions": int(mask.sum())} if mask is not None else {}),
          "suggested_temperature": better, "entropy_at_suggested": normalised_entropy(logits, better)}
    return [finding("overconfident_soft_labels", "medium",
                    f"at {key}={t:g}{', the largest T of the schedule' if scheduled else ''} the teacher's softened "
                    f"outputs have mean entropy {h:.3f} of "
                    f"log(C) on the validation split (threshold entropy_min={TH['entropy_min']}): nearly one-hot, "
                    f"little dark knowledge", ev,
                    f"raise the temperature: --set {key}={better:g} gives entropy "
                    f"{ev['entropy_at_suggested']:.3f} of log(C) on the same logits")]


def capacity_gap(run: RunView) -> List[Dict[str, Any]]:
    """A much larger teacher, a distilled student far below it, and distillation gaining little."""
    acc, split = run.judged(TEACHER, STUDENT, SCRATCH)
    teacher, student, scratch = acc[TEACHER], acc[STUDENT], acc[SCRATCH]
    ratio = run.params("teacher") / run.params("student")
    gain, gap = student - scratch, teacher - student
    if not (gain < TH["kd_gain_min"] and gap > TH["teacher_gap"] and ratio > TH["param_ratio"]):
        return []
    ev = {"split": split, "teacher_accuracy": teacher, "student_accuracy": student, "scratch_accuracy": scratch,
          "kd_gain": gain, "kd_gain_min": TH["kd_gain_min"], "teacher_minus_student": gap,
          "teacher_gap": TH["teacher_gap"], "param_ratio": ratio, "param_ratio_min": TH["param_ratio"]}
    from .chain import names as chain_names
    assistants = run.cfg["distill"].get("assistants") or []
    if assistants:
        ev["assistants"] = assistants
        fix = (f"the run already distils through {len(chain_names(run.cfg))} assistant(s) (distill.assistants); "
               f"list one more of intermediate size, or use a smaller teacher")
    elif run.cfg["data"]["dataset"] in ("text", "text_lm", "completions", "arith"):  # (chains: not for these)
        fix = ("distil through a model of intermediate size in two runs, the first run's student as the second's "
               "teacher (Mirzadeh et al. 2020; distill.assistants chains are for the registry's vision and tabular "
               "models), or use a smaller teacher")
    else:
        fix = ("distil through a teacher assistant of intermediate size (Mirzadeh et al. 2020): "
               "--set distill.assistants=auto (or list them: distill.assistants: [{model: ..., args: ...}])")
    return [finding("capacity_gap", "medium",
                    f"the teacher is {ratio:.0f}x larger (> {TH['param_ratio']:g}x), the distilled student is "
                    f"{gap:.3f} below it in {run.measure(split)} (> teacher_gap={TH['teacher_gap']}) and gains only "
                    f"{gain:+.3f} over scratch (< kd_gain_min={TH['kd_gain_min']}): too large a gap to learn across",
                    ev, fix)]


def _spikes(records: List[Dict[str, Any]], log_c: float) -> List[Dict[str, Any]]:
    """Step windows whose max batch loss is far above the running median of the mean loss before them; in
    the warm-up records, where the loss falls too fast for a median, far above the first record's loss
    (the untrained model's, which training only lowers: a blow-up)."""
    out = []
    for i in range(1, len(records)):
        r = records[i]
        warm = i < TH["warmup_records"]
        before = records[:1] if warm else records[max(0, i - int(TH["median_window"])):i]
        window = [p["loss_total"] for p in before if "loss_total" in p]
        peak = r.get("loss_total_max")
        if not window or peak is None:
            continue
        med = statistics.median(window)
        if peak > TH["blowup_ratio" if warm else "spike_ratio"] * med and peak - med > TH["spike_excess"] * log_c \
                and (not warm or peak > log_c):  # (a blow-up passes the untrained model's loss, about log C)
            out.append({"step": r["step"], "epoch": r["epoch"], "loss_total_max": peak, "running_median": med})
    return out


def _largest_val_drop(records: List[Dict[str, Any]]) -> Tuple[float, Optional[int]]:
    """The largest fall of validation accuracy between consecutive epochs after the warm-up epochs."""
    worst, at = 0.0, None
    records = [r for r in records if r.get("val_accuracy") is not None]  # (none without a validation split)
    for prev, cur in zip(records, records[1:]):
        if cur["epoch"] > TH["warmup_epochs"] and prev["val_accuracy"] - cur["val_accuracy"] > worst:
            worst, at = prev["val_accuracy"] - cur["val_accuracy"], cur["epoch"]
    return worst, at


def did_not_learn(run: RunView, role: str) -> Optional[float]:
    """The last epoch's training accuracy of `role` when it and the validation accuracy are at chance (1/C plus
    chance_margin) after at least min_epochs epochs: the model learnt nothing, a failed training rather than a
    size or generalisation problem. None when it learnt, when it trained too briefly to say, when the log has
    no training accuracy, and for language models (whose next-token accuracy is far above 1/V by word
    frequencies alone)."""
    records = run.epochs.get(role) or []
    if len(records) < TH["min_epochs"] or run.cfg["data"]["dataset"] in LM_DATASETS:
        return None
    acc, val = records[-1].get("train_accuracy"), records[-1].get("val_accuracy")
    chance = 1 / max(run.num_classes, 2) + TH["chance_margin"]
    return acc if acc is not None and acc <= chance and (val is None or val <= chance) else None


def unstable_loss(run: RunView) -> List[Dict[str, Any]]:
    """Loss spikes, skipped NaN/Inf steps, oscillating validation accuracy, or no learning at all, per role."""
    if not run.epochs and not run.steps:
        raise Skip("log.jsonl has no training records")
    log_c = math.log(max(run.num_classes, 2))
    out = []
    for role in dict.fromkeys([*run.epochs, *run.steps]):
        spikes = _spikes(run.steps.get(role, []), log_c)
        skipped = sum(int(r.get("skipped_steps", 0)) for r in run.epochs.get(role, []))
        drop, drop_epoch = _largest_val_drop(run.epochs.get(role, []))
        chance = did_not_learn(run, role)
        if not spikes and not skipped and drop <= TH["val_drop"] and chance is None:
            continue
        lr = role_train(run.cfg, role)["optimizer"]["lr"]
        if role.startswith("compress_") and run.cfg["compress"]["lr"]:
            lr = run.cfg["compress"]["lr"]
        worst = max(spikes, key=lambda s: s["loss_total_max"] / max(s["running_median"], 1e-12)) if spikes else None
        ev = {"role": role, "spikes": len(spikes), "worst_spike": worst, "spike_ratio": TH["spike_ratio"],
              "spike_excess_nats": TH["spike_excess"] * log_c, "skipped_steps": skipped,
              "largest_val_drop": drop, "val_drop_epoch": drop_epoch, "val_drop": TH["val_drop"], "lr": lr,
              "train_accuracy_at_chance": chance}
        what = []
        if spikes:
            what.append(f"{len(spikes)} loss spike(s), worst at step {worst['step']}: max batch loss "
                        f"{worst['loss_total_max']:.3g} vs running median {worst['running_median']:.3g} "
                        f"(> spike_ratio={TH['spike_ratio']:g}x)")
        if skipped:
            what.append(f"{skipped} step(s) skipped for a NaN/Inf loss or gradient")
        if drop > TH["val_drop"]:
            what.append(f"validation accuracy fell {drop:.3f} at epoch {drop_epoch} (> val_drop={TH['val_drop']})")
        if chance is not None:
            what.append(f"it learnt nothing: training accuracy {chance:.3f} at the last epoch, chance is "
                        f"{1 / max(run.num_classes, 2):.3f}")
        clip = "" if role_train(run.cfg, role)["grad_clip"] else \
            f", or clip gradients: --set {recipe_section(role)}.train.grad_clip=1.0"
        fix = f"lower the learning rate: --set {lr_key(role)}={lr / 2:g} (now {lr:g}){clip}"
        peak = max((r.get("loss_total_max", 0) for r in run.steps.get(role, [])), default=0)
        if chance is not None and not spikes and not skipped and peak <= TH["blowup_ratio"] * log_c:
            epochs = role_train(run.cfg, role)["epochs"]  # (no blow-up: it barely moved, rather than diverged)
            fix = (f"it barely trained: raise the learning rate (--set {lr_key(role)}={lr * 3:g}, now {lr:g}) or "
                   f"train longer (--set {recipe_section(role)}.train.epochs={epochs * 2}, "
                   f"now {epochs})")
        ev["max_batch_loss"] = peak
        out.append(finding("unstable_loss", "high" if skipped or chance is not None else "medium",
                           f"{role}: " + "; ".join(what), ev, fix))
    return out


def _val_loss_rise(records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Validation loss rising for rise_epochs or more epochs from its minimum while the training loss falls."""
    rows = [r for r in records if r.get("val_loss") is not None]
    if len(rows) <= TH["rise_epochs"]:
        return None
    best = min(rows, key=lambda r: r["val_loss"])
    last = rows[-1]
    train = "loss_ce" if "loss_ce" in last else "loss_total"
    if (last["epoch"] - best["epoch"] >= TH["rise_epochs"] and last["val_loss"] > TH["rise_factor"] * best["val_loss"]
            and last.get(train, math.inf) < best.get(train, -math.inf)):
        return {"min_val_loss": best["val_loss"], "min_epoch": best["epoch"], "last_val_loss": last["val_loss"],
                "last_epoch": last["epoch"], f"train_{train}_at_min": best[train], f"train_{train}_last": last[train],
                "rise_factor": TH["rise_factor"], "rise_epochs": TH["rise_epochs"]}
    return None


def overfitting(run: RunView) -> List[Dict[str, Any]]:
    """A large train/validation accuracy gap, or validation loss rising while the training loss falls."""
    roles = [r for r in (*ROLES, *[k for k in run.metrics if is_assistant(k)]) if r in run.metrics]
    logged = [r for r in roles if run.epochs.get(r)]
    if not logged:
        raise Skip("log.jsonl has no epoch records of the trained models")
    out = []
    for role in logged:
        if did_not_learn(run, role) is not None or len(run.epochs[role]) < TH["min_epochs"]:
            continue  # (a failed training, unstable_loss's finding, or too short a one: not memorising)
        last = run.epochs[role][-1]
        if last.get("train_accuracy") is not None:
            train, val, source = last["train_accuracy"], last.get("val_accuracy"), "log: last epoch"
        else:
            accs, source = run.train_accuracy((role,))
            train, val = accs[role], run.metrics[role].get("val_accuracy", last.get("val_accuracy"))
        if val is None:  # data.val_fraction: 0, no validation split to compare with
            continue
        rise = _val_loss_rise(run.epochs[role])
        gap = train - val
        if gap <= TH["overfit_gap"] and not rise:
            continue
        ev = {"role": role, "train_accuracy": train, "val_accuracy": val, "gap": gap, "overfit_gap": TH["overfit_gap"],
              "source": source, "epochs": last["epoch"], "selected_epoch": run.metrics[role].get("selected_epoch"),
              **(rise or {})}
        what = []
        if gap > TH["overfit_gap"]:
            what.append(f"training accuracy {train:.3f} vs validation {val:.3f} (gap {gap:.3f} > "
                        f"overfit_gap={TH['overfit_gap']})")
        if rise:
            what.append(f"validation loss rose from {rise['min_val_loss']:.3g} (epoch {rise['min_epoch']}) to "
                        f"{rise['last_val_loss']:.3g} (epoch {rise['last_epoch']}) while the training loss fell")
        kept = ev["selected_epoch"]
        at_kept = next((r.get("val_loss") for r in run.epochs[role] if r.get("epoch") == kept), None)
        spared = (rise is not None and gap <= TH["overfit_gap"] and at_kept is not None
                  and at_kept < TH["rise_factor"] * rise["min_val_loss"])
        if spared:  # (selection kept an epoch before the rise: the model used is not the overfitted one)
            what.append(f"the selected model is of epoch {kept}, before the rise, so it is unaffected and the "
                        f"later epochs were spent for nothing")
        out.append(finding("overfitting", "low" if spared else "medium", f"{role}: " + "; ".join(what), ev,
                           _regularise(run, role)))
    return out


def _regularise(run: RunView, role: str) -> str:
    key = "teacher" if role == "teacher" else "student"
    tcfg = role_train(run.cfg, role)
    wd = tcfg["optimizer"]["weight_decay"]
    tips = [f"more weight decay: --set {key}.train.optimizer.weight_decay={min(wd * 10, 0.1) if wd else 1e-4:g} "
            f"(now {wd:g})"] if wd < 0.1 else []  # (0.1: AdamW's usual ceiling; past it, decay is not the lever)
    tips.append(f"fewer epochs: --set {key}.train.epochs={max(1, tcfg['epochs'] // 2)} (now {tcfg['epochs']})")
    args = run.cfg[key].get("args") or {}
    if run.cfg[key].get("model") in ("mlp", "cnn") and not args.get("dropout") and not is_assistant(role):
        tips.append(f"dropout: --set {key}.args.dropout=0.3")  # (an assistant's args are in distill.assistants)
    d = run.cfg["data"]
    if d["train_subset"]:
        tips.append(f"more data: data.train_subset={d['train_subset']} keeps only that many training rows; "
                    f"raise or remove it")
    elif (d.get("as_image") or len(getattr(run.data, "input_shape", ())) == 3) and \
            not run.cfg[key]["augment"].get("random_crop"):  # (already shifted: more of it is no sure help)
        tips.append(f"augmentation: --set {key}.augment.random_crop=2")
    return "regularise: " + "; or ".join(tips)


def _wider(args: Dict[str, Any]) -> Dict[str, Any]:
    """The width arguments (hidden, channels) doubled."""
    out = {}
    for k in ("hidden", "channels"):
        v = args.get(k)
        if isinstance(v, int):
            out[k] = v * 2
        elif isinstance(v, list) and all(isinstance(x, int) for x in v):
            out[k] = [x * 2 for x in v]
    return out


def student_too_small(run: RunView) -> List[Dict[str, Any]]:
    """Both students far below the teacher although distillation helps, or the student cannot even fit
    its training data: more capacity, not a better teacher, is what it needs."""
    acc, split = run.judged(TEACHER, STUDENT, SCRATCH)
    teacher, student, scratch = acc[TEACHER], acc[STUDENT], acc[SCRATCH]
    gain = student - scratch
    if not (teacher - student > TH["teacher_gap"] and teacher - scratch > TH["teacher_gap"]):
        return []
    failed = [r for r in (STUDENT, SCRATCH) if did_not_learn(run, r) is not None]
    if failed:
        raise Skip(f"{' and '.join(failed)} learnt nothing (see unstable_loss): a failed training says nothing "
                   f"of the student's size")
    train, source = run.train_accuracy(("teacher", "student"))
    underfit = train["teacher"] - train["student"] > TH["underfit_gap"]
    if not (gain > TH["kd_gain_min"] or underfit):
        return []
    ev = {"split": split, "teacher_accuracy": teacher, "student_accuracy": student, "scratch_accuracy": scratch,
          "teacher_gap": TH["teacher_gap"], "kd_gain": gain, "kd_gain_min": TH["kd_gain_min"],
          "teacher_train_accuracy": train["teacher"], "student_train_accuracy": train["student"],
          "underfit_gap": TH["underfit_gap"], "train_accuracy_source": source,
          "student_params": run.metrics["student"].get("params")}
    why = [f"distillation helps ({gain:+.3f} over scratch)"] if gain > TH["kd_gain_min"] else []
    if underfit:
        why.append(f"the student cannot fit its training data (training accuracy {train['student']:.3f} vs the "
                   f"teacher's {train['teacher']:.3f}, > underfit_gap={TH['underfit_gap']})")
    s = run.cfg["student"]
    wider = _wider(s.get("args") or {})
    if wider:
        fix = "a wider or deeper student: " + " ".join(
            f"--set student.args.{k}={json.dumps(v).replace(' ', '')} (now {json.dumps(s['args'][k])})"
            for k, v in wider.items())
    else:
        from .recipe import is_text
        fix = ("a larger student: more layers or width (student.hf_config, student.from_teacher.layers)"
               if is_text(run.cfg, "student") else "a wider or deeper student (student.model / student.args / "
                                                   "student.arch)")
    return [finding("student_too_small", "medium",
                    f"both students are far below the teacher in {run.measure(split)} (distilled {student:.3f}, "
                    f"scratch {scratch:.3f}, "
                    f"teacher {teacher:.3f}; > teacher_gap={TH['teacher_gap']}), and " + ", and ".join(why),
                    ev, fix)]


def quantization_loss(run: RunView) -> List[Dict[str, Any]]:
    """An int8 variant in bench/bench.json losing more than bench.max_accuracy_drop against its fp32 model, on
    validation accuracy as bench chooses its recommendation (test accuracy where the data has no validation
    split): advice drawn from the test split, followed, tunes the deployment on it."""
    from .compress.bench import INT8, is_stale, model_versions
    if not run.bench:
        raise Skip(f"no bench/bench.json; run `distill bench {shlex.quote(run.folder)}` first")
    max_drop = float(run.bench_setting("max_accuracy_drop"))
    results = run.bench.get("results") if isinstance(run.bench, dict) else None
    results = [r for r in (results if isinstance(results, list) else []) if isinstance(r, dict) and "error" not in r
               and {"model", "variant"} <= set(r) and isinstance(r.get("accuracy"), (int, float))]
    versions = model_versions(run.folder)
    rows = {(r["model"], r["variant"]): r for r in results if not is_stale(r, versions)}
    if results and not rows:
        raise Skip("bench/bench.json measured earlier versions of the models (trained again since); run "
                   f"`distill bench {shlex.quote(run.folder)}` again")
    on_val = rows and all(isinstance(r.get("val_accuracy"), (int, float)) for r in rows.values())
    key, split = ("val_accuracy", "validation") if on_val else ("accuracy", "test")
    drops = {k: rows[(k[0], "fp32")][key] - r[key] for k, r in rows.items()
             if k[1] in INT8 and (k[0], "fp32") in rows}
    if not drops:
        raise Skip("bench/bench.json has no int8 variant beside its fp32 model")
    out = []
    for (model, variant), drop in drops.items():
        if drop <= max_drop + 1e-12:
            continue
        fp32, int8 = rows[(model, "fp32")], rows[(model, variant)]
        ev = {"model": model, "variant": variant, "split": split, "fp32_accuracy": fp32[key],
              "int8_accuracy": int8[key], "drop": drop, "max_accuracy_drop": max_drop}
        if on_val:
            ev.update(fp32_test_accuracy=fp32["accuracy"], int8_test_accuracy=int8["accuracy"])
        pair = DYNAMIC_OF.get(variant)
        if pair and (model, pair) in drops:
            ev[f"{pair}_drop"] = drops[(model, pair)]
        fix = _int8_fix(run, model, variant, rows, drops, max_drop, key)
        out.append(finding("quantization_loss", "medium",
                           f"{model} {variant}: {split} accuracy {ev['int8_accuracy']:.4f} vs "
                           f"{ev['fp32_accuracy']:.4f} in fp32, a drop of {drop:.4f} "
                           f"(> bench.max_accuracy_drop={max_drop})", ev, fix))
    return out


def _int8_fix(run: RunView, model: str, variant: str, rows: Dict[Tuple[str, str], Dict[str, Any]],
              drops: Dict[Tuple[str, str], float], max_drop: float, key: str) -> str:
    """What to deploy instead of an int8 variant over the budget: an alternative is offered only within it,
    and QAT's int8 model only for a model it would replace (the compress chain's source and steps), measured
    against that model's fp32 (not the QAT model's own); on the split the drops were judged on (`key`)."""
    within = max_drop + 1e-12
    pair = DYNAMIC_OF.get(variant)
    if pair and drops.get((model, pair), math.inf) <= within:
        return (f"deploy the {pair} int8 variant instead (it loses {drops[(model, pair)]:.4f}), or calibrate on "
                f"more samples: --set bench.calibration={run.bench_setting('calibration') * 4} "
                f"(now {run.bench_setting('calibration')})")
    # (the chain: the source, then each step's model, layers' named by depth, compress/layers2, each made from
    # the one before; QAT's from the last)
    chain = model == run.cfg["compress"]["source"] or (model.startswith("compress/") and model != "compress/qat")
    qat = rows.get(("compress/qat", variant)) if chain else None
    below = rows[(model, "fp32")][key] - qat[key] if qat else None
    if below is not None and below <= within:
        return (f"deploy compress/qat's {variant} int8 variant instead (the QAT model: {qat[key]:.4f}, "
                f"{below:.4f} below {model} in fp32)")
    static = [v for v, d in DYNAMIC_OF.items() if d == variant and drops.get((model, v), math.inf) <= within]
    instead = f"; or deploy the {static[0]} int8 variant, which loses {drops[(model, static[0])]:.4f}" if static else ""
    if qat is None and chain:
        steps = [s for s in run.cfg["compress"]["steps"] if s != "qat"] + ["qat"]
        return (f"quantization-aware training: --set 'compress.steps=[{', '.join(steps)}]' then "
                f"`distill compress` and `distill bench` again (QAT learns weights that survive int8){instead}")
    also = f"compress/qat's {variant} variant loses too ({qat[key]:.4f}): " if qat else ""
    return (f"{also}deploy in fp32, fp16 or bf16, or calibrate static int8 on more samples (--set "
            f"bench.calibration={run.bench_setting('calibration') * 4}){instead}")


RULES: List[Tuple[str, Callable[[RunView], List[Dict[str, Any]]]]] = [
    ("weak_teacher", weak_teacher),
    ("overconfident_soft_labels", overconfident_soft_labels),
    ("capacity_gap", capacity_gap),
    ("unstable_loss", unstable_loss),
    ("overfitting", overfitting),
    ("student_too_small", student_too_small),
    ("quantization_loss", quantization_loss),
]


# ---------------------------------------------------------------- the command

def doctor(folder: str) -> Dict[str, Any]:
    """Run every rule on a run folder; write and return {findings, ran, skipped}."""
    run = RunView(folder)
    findings: List[Dict[str, Any]] = []
    ran: List[str] = []
    skipped: Dict[str, str] = {}
    for name, rule in RULES:
        try:
            found = rule(run)
        except Skip as e:
            skipped[name] = str(e)
            continue
        ran.append(name)
        findings += [{**f, "evidence": _short(f["evidence"])} for f in found]
    report = {"run": folder, "findings": findings, "ran": ran, "skipped": skipped, "thresholds": THRESHOLDS}
    write_json(os.path.join(folder, "doctor.json"), report)
    return report


def format_report(report: Dict[str, Any]) -> str:
    """The findings, each with its evidence and suggestion, then which checks ran and which were skipped."""
    f = report["findings"]
    lines = [f"{len(f)} problem{'s' if len(f) != 1 else ''} found" if f else "no problems found"]
    for x in f:
        lines += ["", f"[{x['severity']}] {x['rule']}: {x['message']}",
                  "  evidence: " + ", ".join(f"{k}={_fmt(v)}" for k, v in x["evidence"].items() if v is not None),
                  f"  suggestion: {x['suggestion']}"]
    lines += ["", f"checks run: {', '.join(report['ran']) or 'none'}"]
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    lines.append(f"report: {os.path.join(report['run'], 'doctor.json')}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)
