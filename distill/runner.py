"""The runner: wires the components a recipe names into four stages on one run folder.

    train-teacher -> soft-labels -> train-student (distilled + scratch baseline) -> evaluate

Each training stage records a fingerprint of its inputs in `stages.json`; when the fingerprint and the
output file are unchanged the stage is skipped (the teacher is not retrained, soft labels are reused).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import __version__
from .checkpoint import Checkpoints
from .data import DataBundle, has_augmentation, load_data
from .errors import UserError
from .evaluate import evaluate_model, mean_std
from .hooks import FeatureCapture
from .io import append_jsonl, load_meta, load_weights, read_json, save_model, sha256_file, sha256_json, \
    weights_sha256, write_json, write_text
from .models import build_model
from .recipe import Recipe
from .softlabels import CachedOutputs, cache_key, default_cache_dir, load_or_build, teacher_forward
from .train import Interrupted, Objective, fit, set_seed  # noqa: F401  (Interrupted: for callers)

MODELS_OUT = ("teacher", "student", "student_scratch")


def run_folder(recipe: Recipe, out: Optional[str] = None) -> str:
    """--out, else the recipe's output.dir, else runs/<name>."""
    return out or recipe.cfg["output"]["dir"] or os.path.join("runs", recipe.cfg["name"])


class RunDir:
    """A run folder: the resolved recipe, the data, and the bookkeeping of which stages are done."""

    def __init__(self, recipe: Recipe, out: Optional[str] = None, echo=print, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.recipe, self.cfg = recipe, recipe.cfg
        self.out = run_folder(recipe, out)
        self.echo, self.resume = echo, resume
        self._refuse_other_run(overwrite)
        self._preflight()
        try:
            os.makedirs(self.out, exist_ok=True)
            write_text(self.path("recipe.yaml"), recipe.to_yaml())
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write the run folder ({e.strerror})") from None
        self.log = self.path("log.jsonl")

    def _refuse_other_run(self, overwrite: bool) -> None:
        """A folder holding a run of another recipe is not silently mixed with this one."""
        old = self.path("recipe.yaml")
        if overwrite or not os.path.isfile(old):
            return
        try:
            before = Recipe.load(old).cfg
        except UserError:
            before = None
        strip = lambda cfg: {k: v for k, v in (cfg or {}).items() if k != "output"}  # noqa: E731
        if strip(before) != strip(self.cfg):
            raise UserError(f"--out {self.out}: the folder holds a run of a different recipe; choose another "
                            f"folder, or pass --overwrite to replace it (unchanged stages are still reused)")

    def _preflight(self) -> None:
        """Load the data, build both models and one distillation step on two samples, before anything is
        written: a mistake the recipe validator cannot see (a layer shape, a feature name, a checkpoint of
        another architecture or class list) stops the run here with no half-made run folder."""
        teacher, student = build_role(self, "teacher"), build_role(self, "student")
        t_shapes, s_shapes = _feature_shapes(self, teacher, student)
        source = teacher_source(self, teacher, "online", quiet=True)
        x, y = self.data.x_train[:2], self.data.y_train[:2]
        Objective(student, self.cfg["distill"], source, t_shapes, s_shapes)(x, y, torch.arange(2))

    def train_cfg(self, role: str) -> Dict[str, Any]:
        """The resolved `train` section of the teacher, or of both students."""
        return self.cfg["teacher" if role == "teacher" else "student"]["train"]

    def checkpoints(self, role: str) -> Checkpoints:
        return Checkpoints(self.path(os.path.join("checkpoints", role)), self.train_cfg(role)["keep_checkpoints"],
                           self.echo)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    @cached_property
    def data(self) -> DataBundle:
        return load_data(self.cfg["data"])

    def stage_done(self, name: str, fingerprint: str, files: Sequence[str]) -> Optional[Dict[str, Any]]:
        rec = read_json(self.path("stages.json"), {}).get(name)
        if rec and rec["fingerprint"] == fingerprint and all(os.path.isfile(self.path(f)) for f in files):
            return rec
        return None

    def mark_done(self, name: str, fingerprint: str, info: Dict[str, Any]) -> None:
        stages = read_json(self.path("stages.json"), {})
        stages[name] = {"fingerprint": fingerprint, **info}
        write_json(self.path("stages.json"), stages)
        shutil.rmtree(self.path(os.path.join("checkpoints", name)), ignore_errors=True)  # the stage is done
        if os.path.isdir(self.path("checkpoints")) and not os.listdir(self.path("checkpoints")):
            os.rmdir(self.path("checkpoints"))

    def fit(self, role: str, objective: Objective) -> Dict[str, Any]:
        return fit(role, objective, self.data, self.cfg["data"], self.train_cfg(role), self.log,
                   self.checkpoints(role), self.resume)

    def event(self, message: str, **fields: Any) -> None:
        self.echo(message)
        append_jsonl(self.log, {"event": message, **fields})


# ---------------------------------------------------------------- models

def model_spec(run: RunDir, role: str) -> Dict[str, Any]:
    """The architecture of `role`: from the recipe, or from the checkpoint's own metadata."""
    m = run.cfg[role]
    if m["model"] or m["arch"]:
        return {"model": m["model"], "args": m["args"], "arch": m["arch"]}
    spec = load_meta(m["checkpoint"]).get("spec")
    if not spec:
        raise UserError(f"{role}.checkpoint: {m['checkpoint']} does not say its architecture; add {role}.model")
    return spec


def build_role(run: RunDir, role: str) -> nn.Module:
    """Build the teacher or student for this data, from its checkpoint when the recipe gives one."""
    m, data = run.cfg[role], run.data
    set_seed(m["train"]["seed"])  # same seed, same init: the scratch and distilled students start equal
    model = build_model(model_spec(run, role), data.input_shape, data.num_classes, where=role)
    if m["checkpoint"]:
        meta = load_meta(m["checkpoint"])
        if meta.get("num_classes") not in (None, data.num_classes):
            raise UserError(f"{role}.checkpoint: {m['checkpoint']} was trained for {meta['num_classes']} classes "
                            f"but the data has {data.num_classes}")
        names = meta.get("class_names")
        if names and names != data.class_names:
            raise UserError(f"{role}.checkpoint: {m['checkpoint']} was trained on classes {names} but the data "
                            f"has {data.class_names}; teacher and student must share one class list")
        load_weights(model, m["checkpoint"], f"{role}.checkpoint")
    return model


def save_role(run: RunDir, model: nn.Module, name: str, spec: Dict[str, Any], info: Dict[str, Any]) -> None:
    data = run.data
    save_model(model, run.path(f"{name}.safetensors"),
               {"spec": spec, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                "class_names": data.class_names, "role": name, **info})


def require_saved(folder: str, name: str) -> str:
    """The path of `name`.safetensors in a run folder, or a clear error naming the stage that makes it."""
    path = os.path.join(folder, f"{name}.safetensors")
    if not os.path.isfile(path):
        stage = "train-teacher" if name == "teacher" else "train-student"
        raise UserError(f"{path}: missing; run the stage that makes it first (distill run, or distill {stage})")
    return path


def load_saved(run: RunDir, name: str) -> nn.Module:
    path = require_saved(run.out, name)
    meta = load_meta(path)
    model = build_model(meta["spec"], tuple(meta["input_shape"]), meta["num_classes"], where=name)
    load_weights(model, path, name)
    return model


# ---------------------------------------------------------------- stages

def train_teacher(run: RunDir) -> nn.Module:
    m = run.cfg["teacher"]
    spec = model_spec(run, "teacher")
    fp = sha256_json({"spec": spec, "train": m["train"], "data": run.data.fingerprint, "version": __version__,
                      "checkpoint": sha256_file(m["checkpoint"]) if m["checkpoint"] else None})
    if run.stage_done("teacher", fp, ["teacher.safetensors"]):
        run.event("teacher: inputs unchanged, reusing teacher.safetensors", model="teacher")
        return load_saved(run, "teacher")
    teacher = build_role(run, "teacher")
    t0 = time.perf_counter()
    if m["checkpoint"]:
        run.event(f"teacher: loaded from {m['checkpoint']} (not retrained)", model="teacher")
        info: Dict[str, Any] = {"loaded_from": m["checkpoint"]}
    else:
        info = run.fit("teacher", Objective(teacher))
    info["train_time_s"] = round(time.perf_counter() - t0, 3)
    save_role(run, teacher, "teacher", spec, info)
    run.mark_done("teacher", fp, info)
    return teacher


def soft_labels(run: RunDir, teacher: Optional[nn.Module] = None) -> CachedOutputs:
    """Teacher logits (and hooked features) on the un-augmented training inputs, from the on-disk cache."""
    teacher = teacher or load_saved(run, "teacher")
    layers = [f["teacher"] for f in run.cfg["distill"]["features"]]
    key = cache_key(weights_sha256(teacher), run.data.fingerprint, layers)
    cache_dir = run.cfg["output"]["cache_dir"] or default_cache_dir()
    outputs, hit = load_or_build(teacher, run.data.x_train, key, cache_dir, layers, run.cfg["data"]["eval_batch_size"])
    run.event(f"soft labels: cache {'hit' if hit else 'miss, computed'} ({os.path.join(cache_dir, key)})",
              cache_key=key, hit=hit)
    write_json(run.path("soft_labels.json"), {"cache_key": key, "cache_dir": cache_dir, "layers": layers})
    return outputs


def teacher_mode(run: RunDir) -> str:
    """`auto`: cached soft labels, unless augmentation gives new views every epoch (then online)."""
    mode = run.cfg["distill"]["teacher_outputs"]
    if mode == "auto":
        mode = "online" if has_augmentation(run.cfg["data"]["transforms"]) else "cached"
    return mode


def train_student(run: RunDir, teacher: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The distilled student and, with the same budget and init, the scratch (no-teacher) baseline."""
    s, dcfg = run.cfg["student"], run.cfg["distill"]
    spec = model_spec(run, "student")
    base = {"spec": spec, "train": s["train"], "data": run.data.fingerprint, "version": __version__,
            "init": sha256_file(s["checkpoint"]) if s["checkpoint"] else None}
    results = {}
    fp = sha256_json(base)
    if not run.stage_done("student_scratch", fp, ["student_scratch.safetensors"]):
        scratch = build_role(run, "student")
        t0 = time.perf_counter()
        info = run.fit("student_scratch", Objective(scratch))
        info["train_time_s"] = round(time.perf_counter() - t0, 3)
        save_role(run, scratch, "student_scratch", spec, info)
        run.mark_done("student_scratch", fp, info)
    else:
        run.event("student_scratch: inputs unchanged, reusing student_scratch.safetensors", model="student_scratch")
    results["student_scratch"] = read_json(run.path("stages.json"))["student_scratch"]

    mode = teacher_mode(run)
    teacher = teacher or load_saved(run, "teacher")
    fp = sha256_json({**base, "distill": dcfg, "mode": mode, "teacher": weights_sha256(teacher)})
    if run.stage_done("student", fp, ["student.safetensors"]):
        run.event("student: inputs unchanged, reusing student.safetensors", model="student")
    else:
        student = build_role(run, "student")
        source = teacher_source(run, teacher, mode)
        t_shapes, s_shapes = _feature_shapes(run, teacher, student)
        objective = Objective(student, dcfg, source, t_shapes, s_shapes)
        t0 = time.perf_counter()
        info = run.fit("student", objective)
        info.update(train_time_s=round(time.perf_counter() - t0, 3), teacher_outputs=mode)
        save_role(run, student, "student", spec, info)  # the projectors stay behind in `objective`
        run.mark_done("student", fp, info)
    results["student"] = read_json(run.path("stages.json"))["student"]
    return results


def teacher_source(run: RunDir, teacher: nn.Module, mode: str, quiet: bool = False):
    layers = [f["teacher"] for f in run.cfg["distill"]["features"]]
    if mode == "cached":
        cached = soft_labels(run, teacher)
        run.event("student: teacher outputs from the soft-label cache (the teacher is not run while training)",
                  teacher_outputs="cached")
        return lambda x, idx: cached.batch(idx)
    if not quiet:
        run.event("student: teacher run online on every batch (augmented views differ per epoch)",
                  teacher_outputs="online")
    capture = FeatureCapture(teacher, layers, "distill.features")

    def online(x: torch.Tensor, idx: torch.Tensor):
        with capture:
            return teacher_forward(teacher, x, capture)
    return online


def _feature_shapes(run: RunDir, teacher: nn.Module, student: nn.Module):
    """Per-sample output shapes of the hooked layers, from one dry batch (to size the projectors)."""
    feats = run.cfg["distill"]["features"]
    if not feats:
        return {}, {}
    x = run.data.x_train[:2]
    shapes = []
    for model, side in ((teacher, "teacher"), (student, "student")):
        with FeatureCapture(model, [f[side] for f in feats], "distill.features") as cap:
            teacher_forward(model, x, cap)
        shapes.append({k: tuple(v.shape[1:]) for k, v in cap.outputs.items()})
    student.train()
    return shapes[0], shapes[1]


def evaluate(run: RunDir) -> Dict[str, Any]:
    """The test split, touched once per model, for the models selected on validation."""
    data, ecfg = run.data, run.cfg["evaluate"]
    stages = read_json(run.path("stages.json"), {})
    metrics = {}
    for name in MODELS_OUT:
        model = load_saved(run, name)
        m = evaluate_model(model, run.path(f"{name}.safetensors"), data.x_test, data.y_test, ecfg,
                           run.cfg["data"]["eval_batch_size"])
        extra = stages.get(name, {})
        m.update({k: extra[k] for k in ("val_accuracy", "selected_epoch", "train_time_s") if k in extra})
        metrics[name] = m
    write_json(run.path("metrics.json"), metrics)
    return metrics


def run(recipe: Recipe, out: Optional[str] = None, echo=print, resume: bool = False,
        overwrite: bool = False) -> Dict[str, Any]:
    """All four stages; returns the contents of metrics.json. `resume` continues from checkpoints."""
    rd = RunDir(recipe, out, echo, resume=resume, overwrite=overwrite)
    teacher = train_teacher(rd)
    train_student(rd, teacher)
    return evaluate(rd)


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    cfg = copy.deepcopy(recipe.cfg)
    for section in (cfg["train"], cfg["teacher"]["train"], cfg["student"]["train"]):
        section["seed"] = seed
    return Recipe(cfg, recipe.source)


def run_seeds(recipe: Recipe, seeds: List[int], out: Optional[str] = None, echo=print, resume: bool = False,
              overwrite: bool = False) -> Dict[str, Any]:
    """One full run per seed in `OUT/seed_<s>`, then mean and std of every metric in `OUT/summary.json`."""
    base = run_folder(recipe, out)
    per_seed = {s: run(with_seed(recipe, s), os.path.join(base, f"seed_{s}"), echo, resume, overwrite)
                for s in seeds}
    summary: Dict[str, Any] = {"seeds": list(seeds)}
    for name in MODELS_OUT:
        keys = per_seed[seeds[0]][name].keys()
        summary[name] = {k: mean_std([per_seed[s][name][k] for s in seeds]) for k in keys}
    write_json(os.path.join(base, "summary.json"), summary)
    return summary
