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
from .logbook import Logbook, summary_writer_class
from .io import append_jsonl, load_meta, load_weights, read_json, save_model, sha256_file, sha256_json, \
    weights_sha256, write_json, write_text
from .data.augment_text import with_teacher_labelled
from .losses import transformer_features
from .models import build_model
from .monitor import retention_monitor, with_reaction
from .models.hf import HFClassifier, fresh_student, is_model_folder, load_classifier, load_folder, load_tokenizer, \
    resolve_hf_path, same_vocabulary, save_folder, select_layers
from .recipe import Recipe, is_text
from .softlabels import CachedOutputs, cache_key, default_cache_dir, load_or_build, teacher_forward
from .train import Interrupted, Objective, fit, set_seed  # noqa: F401  (Interrupted: for callers)

MODELS_OUT = ("teacher", "student", "student_scratch")
AFTER_TRAINING = ("output", "compress", "bench")


def run_folder(recipe: Recipe, out: Optional[str] = None) -> str:
    """--out, else the recipe's output.dir, else runs/<name>."""
    return out or recipe.cfg["output"]["dir"] or os.path.join("runs", recipe.cfg["name"])


class RunDir:
    """A run folder: the resolved recipe, the data, and the bookkeeping of which stages are done."""

    def __init__(self, recipe: Recipe, out: Optional[str] = None, echo=print, resume: bool = False,
                 overwrite: bool = False, tensorboard: bool = False) -> None:
        self.recipe, self.cfg = recipe, recipe.cfg
        self.out = run_folder(recipe, out)
        self.echo, self.resume = echo, resume
        if tensorboard:
            summary_writer_class()  # a missing package is reported before anything is written
        self.tensorboard = self.path("tensorboard") if tensorboard else None
        self._refuse_other_run(overwrite)
        self._preflight()
        try:
            os.makedirs(self.out, exist_ok=True)
            write_text(self.path("recipe.yaml"), recipe.to_yaml())
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write the run folder ({e.strerror})") from None
        self.log = self.path("log.jsonl")
        self.on_epoch = None  # called after each epoch of the distilled student: (epoch, val_accuracy)

    def _refuse_other_run(self, overwrite: bool) -> None:
        """A folder holding a run of another recipe is not silently mixed with this one."""
        old = self.path("recipe.yaml")
        if overwrite or not os.path.isfile(old):
            return
        try:
            before = Recipe.load(old).cfg
        except UserError:
            before = None
        # output, compress and bench do not change the trained models: a run can be compressed again
        strip = lambda cfg: {k: v for k, v in (cfg or {}).items() if k not in AFTER_TRAINING}  # noqa: E731
        if strip(before) != strip(self.cfg):
            raise UserError(f"--out {self.out}: the folder holds a run of a different recipe; choose another "
                            f"folder, or pass --overwrite to replace it (unchanged stages are still reused)")

    def _preflight(self) -> None:
        """Load the data, build both models and one distillation step on two samples, before anything is
        written: a mistake the recipe validator cannot see (a layer shape, a feature name, a checkpoint of
        another architecture or class list) stops the run here with no half-made run folder."""
        teacher, student = build_role(self, "teacher"), build_role(self, "student")
        self.dcfg = resolve_distill(self.cfg, teacher, student)
        t_shapes, s_shapes = _feature_shapes(self, teacher, student)
        source = teacher_source(self, teacher, "online", quiet=True)
        x, y = self.data.x_train[:2], self.data.y_train[:2]
        Objective(student, self.dcfg, source, t_shapes, s_shapes)(x, y, torch.arange(2))
        from .chain import preflight
        preflight(self, teacher, student)  # teacher-assistant chain: each assistant builds, each link steps

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
        if rec and rec["fingerprint"] == fingerprint and all(os.path.exists(self.path(f)) for f in files):
            return rec
        return None

    def mark_done(self, name: str, fingerprint: str, info: Dict[str, Any]) -> None:
        stages = read_json(self.path("stages.json"), {})
        stages[name] = {"fingerprint": fingerprint, **info}
        write_json(self.path("stages.json"), stages)
        folder = self.path(os.path.join("checkpoints", name))
        shutil.rmtree(folder, ignore_errors=True)  # the stage is done
        while folder != self.out and os.path.isdir(os.path.dirname(folder)):  # and now-empty parents
            folder = os.path.dirname(folder)
            if os.listdir(folder) or folder == self.out:
                break
            os.rmdir(folder)

    def fit(self, role: str, objective: Objective, data: Optional[DataBundle] = None, monitor=None) -> Dict[str, Any]:
        m = self.cfg["monitor"]
        return fit(role, objective, data or self.data, self.cfg["data"], self.train_cfg(role),
                   Logbook(self.log, self.tensorboard), self.checkpoints(role), self.resume, monitor,
                   self.on_epoch if role == "student" else None, m["every"], m["gradients"])

    def event(self, message: str, **fields: Any) -> None:
        self.echo(message)
        append_jsonl(self.log, {"event": message, **fields})


# ---------------------------------------------------------------- models

def resolve_distill(cfg: Dict[str, Any], teacher: nn.Module, student: nn.Module) -> Dict[str, Any]:
    """The `distill` section with `distill.layers` expanded into feature entries for these two models."""
    dcfg = copy.deepcopy(cfg["distill"])
    if isinstance(student, HFClassifier) and isinstance(teacher, HFClassifier):
        ft = cfg["student"]["from_teacher"]
        dcfg["features"] += transformer_features(dcfg["layers"], teacher.num_layers, student.num_layers,
                                                 teacher.width == student.width,
                                                 teacher_layers(ft, teacher.num_layers) if ft else None)
    return dcfg


def teacher_layers(from_teacher: Dict[str, Any], n: int) -> List[int]:
    """The teacher layers a layer-selected student keeps: the list given, or every k-th from the first."""
    return list(from_teacher["layers"]) if from_teacher["layers"] is not None else list(
        range(0, n, from_teacher["keep_every"]))


def model_spec(run: RunDir, role: str) -> Dict[str, Any]:
    """The architecture of `role`: from the recipe, or from the checkpoint's own metadata."""
    m = run.cfg[role]
    if is_text(run.cfg, role):
        spec = {k: m[k] for k in ("hf", "finetuned", "from_teacher", "hf_config")}
        return {**spec, "teacher_hf": run.cfg["teacher"]["hf"]} if role == "student" else spec
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
    if is_text(run.cfg, role):
        return build_text_role(run, role)
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


def build_text_role(run: RunDir, role: str) -> HFClassifier:
    """A transformer teacher or student: loaded from a folder, or derived from the teacher (layer selection,
    or a smaller fresh config). Students must read the teacher's tokens: one vocabulary for both."""
    m, t, names = run.cfg[role], run.cfg["teacher"], run.data.class_names
    if m["hf"]:
        path = resolve_hf_path(m["hf"], f"{role}.hf")
        model = load_classifier(path, names, f"{role}.hf", finetuned=m["finetuned"])
        if role == "student" and not same_vocabulary(load_tokenizer(path, "student.hf"),
                                                     load_tokenizer(run.cfg["data"]["tokenizer"], "data.tokenizer")):
            raise UserError(f"student.hf: {m['hf']} has a different vocabulary from the data's tokenizer "
                            f"({run.cfg['data']['tokenizer']}); teacher and student must share one vocabulary")
        return model
    ft = m["from_teacher"]
    if ft and ft["source"] == "finetuned" and os.path.isdir(run.path("teacher")):
        base = load_saved(run, "teacher")  # (before the teacher is trained, preflight uses the pretrained one)
    else:
        base = load_classifier(resolve_hf_path(t["hf"], "teacher.hf"), names, "teacher.hf", finetuned=t["finetuned"])
    if ft:
        return select_layers(base, teacher_layers(ft, base.num_layers), "student.from_teacher")
    c = m["hf_config"]
    return fresh_student(base, c["layers"], c["hidden"], c["heads"], c["intermediate"], "student.hf_config")


def artifact(name: str, text: bool) -> str:
    """What a stage leaves in the run folder: a Hugging Face folder for transformers, else one file."""
    return name if text else f"{name}.safetensors"


def save_role(run: RunDir, model: nn.Module, name: str, spec: Dict[str, Any], info: Dict[str, Any]) -> None:
    data = run.data
    meta = {"spec": spec, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "class_names": data.class_names, "role": name, **info}
    if isinstance(model, HFClassifier):
        save_folder(model, run.path(name), run.cfg["data"]["tokenizer"], meta)
    else:
        save_model(model, run.path(f"{name}.safetensors"), meta)


def require_saved(folder: str, name: str) -> str:
    """The model `name` in a run folder (a .safetensors file or a Hugging Face folder), or a clear error
    naming the stage that makes it."""
    path = os.path.join(folder, f"{name}.safetensors")
    if os.path.isfile(path) or is_model_folder(os.path.join(folder, name)):
        return path if os.path.isfile(path) else os.path.join(folder, name)
    stage = "train-teacher" if name == "teacher" else "train-student"
    raise UserError(f"{path}: missing; run the stage that makes it first (distill run, or distill {stage})")


def require_run(folder: str, command: str) -> None:
    """A finished run folder (recipe.yaml and metrics.json) for `distill COMMAND`, or one clear line saying
    what is missing."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a run folder; give the folder of a finished run (distill run ... --out DIR)")
    if not os.path.isfile(os.path.join(folder, "recipe.yaml")):
        raise UserError(f"{folder}: not a run folder (no recipe.yaml); give the folder that `distill run` wrote")
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        seeds = (f" (a multi-seed run: {command} one seed folder, e.g. seed_0)"
                 if os.path.isfile(os.path.join(folder, "summary.json")) else "")
        raise UserError(f"{path}: missing; the run is not finished{seeds}, run `distill run` first "
                        f"(or `distill evaluate {folder}`)")


def load_saved(run: RunDir, name: str) -> nn.Module:
    return load_model_at(require_saved(run.out, name), name)


def load_model_at(path: str, name: str) -> nn.Module:
    """A model a stage saved: a Hugging Face folder, or a .safetensors file that names its architecture."""
    if os.path.isdir(path):
        return load_folder(path, name)
    meta = load_meta(path)
    model = build_model(meta["spec"], tuple(meta["input_shape"]), meta["num_classes"], where=name)
    if "structure" in meta:  # pruned by `distill compress`: rebuild its smaller shape before loading
        from .compress.structure import fit_to_shapes, saved_shapes
        fit_to_shapes(model, saved_shapes(path), meta["structure"]["drop"])
    load_weights(model, path, name)
    return model


# ---------------------------------------------------------------- stages

def train_teacher(run: RunDir) -> nn.Module:
    m = run.cfg["teacher"]
    spec = model_spec(run, "teacher")
    fp = sha256_json({"spec": spec, "train": m["train"], "data": run.data.fingerprint, "version": __version__,
                      "checkpoint": sha256_file(m["checkpoint"]) if m["checkpoint"] else None})
    out = artifact("teacher", is_text(run.cfg, "teacher"))
    if run.stage_done("teacher", fp, [out]):
        run.event(f"teacher: inputs unchanged, reusing {out}", model="teacher")
        return load_saved(run, "teacher")
    teacher = build_role(run, "teacher")
    t0 = time.perf_counter()
    loaded = m["checkpoint"] or (m["hf"] if m["finetuned"] else None)
    if loaded:
        run.event(f"teacher: loaded from {loaded} (not retrained)", model="teacher")
        info: Dict[str, Any] = {"loaded_from": loaded}
    else:
        info = run.fit("teacher", Objective(teacher))
    info["train_time_s"] = round(time.perf_counter() - t0, 3)
    save_role(run, teacher, "teacher", spec, info)
    run.mark_done("teacher", fp, info)
    return teacher


def soft_labels(run: RunDir, teacher: Optional[nn.Module] = None, data: Optional[DataBundle] = None
                ) -> CachedOutputs:
    """Teacher logits (and hooked features) on the un-augmented training inputs, from the on-disk cache."""
    teacher, data = teacher or load_saved(run, "teacher"), data or run.data
    layers = [f["teacher"] for f in run.dcfg["features"]]
    if layers and data.pad_id is not None:
        raise UserError("distill.teacher_outputs: cached: text features vary in length per batch and are not "
                        "cached; use teacher_outputs: online (or auto) with transformer layer losses")
    key = cache_key(weights_sha256(teacher), data.fingerprint, layers)
    cache_dir = run.cfg["output"]["cache_dir"] or default_cache_dir()
    outputs, hit = load_or_build(teacher, data.x_train, key, cache_dir, layers, run.cfg["data"]["eval_batch_size"])
    run.event(f"soft labels: cache {'hit' if hit else 'miss, computed'} ({os.path.join(cache_dir, key)})",
              cache_key=key, hit=hit)
    write_json(run.path("soft_labels.json"), {"cache_key": key, "cache_dir": cache_dir, "layers": layers})
    return outputs


def teacher_mode(run: RunDir) -> str:
    """`auto`: cached soft labels, unless augmentation gives new views every epoch (then online)."""
    mode, ddata = run.cfg["distill"]["teacher_outputs"], run.cfg["distill"]["data"]
    if mode == "auto":
        text_online = run.data.pad_id is not None and (
            run.dcfg["features"] or (ddata["mask"] and ddata["teacher_sees"] == "noised"))
        mode = "online" if has_augmentation(run.cfg["data"]["transforms"]) or text_online else "cached"
    return mode


def train_student(run: RunDir, teacher: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The distilled student and, with the same budget and init, the scratch (no-teacher) baseline."""
    s, dcfg = run.cfg["student"], run.dcfg
    spec, text = model_spec(run, "student"), is_text(run.cfg, "student")
    from_finetuned = bool(s["from_teacher"] and s["from_teacher"]["source"] == "finetuned")
    teacher = teacher or load_saved(run, "teacher")  # its weights key both stages' fingerprints
    base = {"spec": spec, "train": s["train"], "data": run.data.fingerprint, "version": __version__,
            "init": sha256_file(s["checkpoint"]) if s["checkpoint"] else None,
            "init_teacher": weights_sha256(teacher) if from_finetuned else None}
    results = {}
    fp = sha256_json(base)
    if not run.stage_done("student_scratch", fp, [artifact("student_scratch", text)]):
        scratch = build_role(run, "student")
        t0 = time.perf_counter()
        info = run.fit("student_scratch", Objective(scratch))
        info["train_time_s"] = round(time.perf_counter() - t0, 3)
        save_role(run, scratch, "student_scratch", spec, info)
        run.mark_done("student_scratch", fp, info)
    else:
        run.event("student_scratch: inputs unchanged, reusing it", model="student_scratch")
    results["student_scratch"] = read_json(run.path("stages.json"))["student_scratch"]

    mode = teacher_mode(run)
    # the monitor's reaction changes training; its other keys only change what is logged
    reaction = {k: run.cfg["monitor"][k] for k in ("retention_min", "watch", "action", "factor")}
    fp = sha256_json({**base, "distill": dcfg, "mode": mode, "teacher": weights_sha256(teacher),
                      "monitor": reaction})
    if run.stage_done("student", fp, [artifact("student", text)]):
        run.event("student: inputs unchanged, reusing it", model="student")
    else:
        student = build_role(run, "student")
        data, added = run.data, {}
        if text:
            data, added = with_teacher_labelled(run.data, run.cfg["distill"]["data"], run.cfg["data"], teacher,
                                                s["train"]["seed"])
            if added:
                run.event(f"student: {len(data.y_train)} training texts, of which teacher-labelled only: "
                          + ", ".join(f"{v} {k}" for k, v in added.items()), added=added)
        info = distil(run, "student", student, teacher, mode, data, react=True)
        info["added"] = added
        save_role(run, student, "student", spec, info)  # the projectors stay behind in the objective
        run.mark_done("student", fp, info)
    results["student"] = read_json(run.path("stages.json"))["student"]
    return results


def distil(run: RunDir, name: str, model: nn.Module, teacher: nn.Module, mode: str,
           data: Optional[DataBundle] = None, react: bool = False) -> Dict[str, Any]:
    """Train `model` as stage `name` by distillation from `teacher` (the student, or a teacher assistant);
    returns the fit's info. Each epoch logs knowledge retention (linear CKA, cosine after the projectors) and
    input-gradient consistency, teacher vs model on a fixed validation probe; with `react`, the recipe's
    monitor rule may also adjust the distillation strength."""
    source = teacher_source(run, teacher, mode, data=data)
    t_shapes, s_shapes = _feature_shapes(run, teacher, model)
    objective = Objective(model, run.dcfg, source, t_shapes, s_shapes)
    monitor = retention_monitor(teacher, model, run.data.x_val[:256],
                                [(f["teacher"], f["student"]) for f in run.dcfg["features"]], objective.projectors,
                                run.data.y_val[:256] if run.cfg["monitor"]["gradients"] else None)
    if react:
        monitor = with_reaction(monitor, objective, run.cfg["monitor"], run.echo)
    t0 = time.perf_counter()
    info = run.fit(name, objective, data, monitor)
    info.update(train_time_s=round(time.perf_counter() - t0, 3), teacher_outputs=mode)
    return info


def teacher_source(run: RunDir, teacher: nn.Module, mode: str, quiet: bool = False,
                   data: Optional[DataBundle] = None):
    layers = [f["teacher"] for f in run.dcfg["features"]]
    if mode == "cached":
        cached = soft_labels(run, teacher, data)
        run.event("student: teacher outputs from the soft-label cache (the teacher is not run while training)",
                  teacher_outputs="cached")
        return lambda x, idx: cached.batch(idx)
    if not quiet:
        run.event("student: teacher run online on every batch (augmented or noised inputs, or feature losses)",
                  teacher_outputs="online")
    capture = FeatureCapture(teacher, layers, "distill.features")

    def online(x: torch.Tensor, idx: torch.Tensor):
        with capture:
            return teacher_forward(teacher, x, capture)
    return online


def _feature_shapes(run: RunDir, teacher: nn.Module, student: nn.Module):
    """Per-sample output shapes of the hooked layers, from one dry batch (to size the projectors)."""
    feats = run.dcfg["features"]
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
    metrics, models = {}, {}
    from . import chain
    for name in (*MODELS_OUT, *chain.names(run.cfg)):
        model = models[name] = load_saved(run, name)
        m = evaluate_model(model, require_saved(run.out, name), data.x_test, data.y_test, ecfg,
                           run.cfg["data"]["eval_batch_size"])
        extra = stages.get(name, {})
        m.update({k: extra[k] for k in ("val_accuracy", "selected_epoch", "train_time_s") if k in extra})
        metrics[name] = m
    write_json(run.path("metrics.json"), metrics)
    chain.report(run, metrics, models)  # chain.json: accuracy and retention per generation, when there are assistants
    return metrics


def run(recipe: Recipe, out: Optional[str] = None, echo=print, resume: bool = False,
        overwrite: bool = False, tensorboard: bool = False) -> Dict[str, Any]:
    """All four stages; returns the contents of metrics.json. `resume` continues from checkpoints."""
    rd = RunDir(recipe, out, echo, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    teacher = train_teacher(rd)
    from .chain import train_assistants
    train_student(rd, train_assistants(rd, teacher))  # the student learns from the last assistant, if any
    return evaluate(rd)


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    cfg = copy.deepcopy(recipe.cfg)
    for section in (cfg["train"], cfg["teacher"]["train"], cfg["student"]["train"]):
        section["seed"] = seed
    return Recipe(cfg, recipe.source)


def run_seeds(recipe: Recipe, seeds: List[int], out: Optional[str] = None, echo=print, resume: bool = False,
              overwrite: bool = False, tensorboard: bool = False) -> Dict[str, Any]:
    """One full run per seed in `OUT/seed_<s>`, then mean and std of every metric in `OUT/summary.json`."""
    base = run_folder(recipe, out)
    per_seed = {s: run(with_seed(recipe, s), os.path.join(base, f"seed_{s}"), echo, resume, overwrite, tensorboard)
                for s in seeds}
    summary: Dict[str, Any] = {"seeds": list(seeds)}
    for name in per_seed[seeds[0]]:  # teacher, students and any assistants
        keys = per_seed[seeds[0]][name].keys()
        summary[name] = {k: mean_std([per_seed[s][name][k] for s in seeds]) for k in keys}
    write_json(os.path.join(base, "summary.json"), summary)
    return summary
