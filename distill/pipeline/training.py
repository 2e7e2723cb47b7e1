"""The stages that train a model, each through the one stage mechanism and the one trainer:

    teacher          trained on the labels, or loaded (not retrained)
    assistant_<i>    distilled from the generation before it (teacher-assistant chains)
    student_scratch  the student's architecture on the labels alone, same init and budget (the baseline)
    student          distilled from the last generation before it

A distilled model learns from its teacher's outputs: cached soft labels when the inputs are the same every
epoch, else the teacher run online on each batch.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .. import chain
from ..data import DataBundle, has_augmentation
from ..data.augment_text import with_augmented_texts
from ..data.datasets import with_teacher_labelled, with_training_split
from ..engine.batch import TeacherSource
from ..engine.callbacks import Checkpointing, EpochHook, GradientSignals, LogLines, Monitor, TensorBoard
from ..engine.inference import model_device
from ..engine.objective import Objective
from ..engine.trainer import Trainer
from ..hooks import FeatureCapture
from ..io import sha256_file, sha256_json, weights_sha256, write_json
from ..models import count_params
from ..monitor import retention_monitor, with_reaction
from ..roles import SCRATCH, STUDENT, TEACHER, log_name
from ..tasks import task_for
from ..teachers import cache_key, default_cache_dir, load_or_build, online_source, teacher_forward
from .artifacts import artifact, build_role, distill_settings, load_saved, model_spec, save_role
from .rundir import RunDir
from .stage import Stage, run_stage

PROBE = chain.PROBE  # validation samples on which retention is measured


# ---------------------------------------------------------------- training one model

def train(run: RunDir, name: str, objective: Objective, data: Optional[DataBundle] = None,
          monitor=None, tcfg: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train `objective.student` as stage `name`: log lines (and TensorBoard), the monitor's signals, gradient
    consistency, checkpoints (resumed with --resume), and the search's per-epoch hook for the student."""
    m, rt = run.cfg["monitor"], run.runtime
    tcfg = tcfg or run.train_cfg(name)
    board = TensorBoard(run.tensorboard) if run.tensorboard and rt.is_main else None
    every = m["every"] if m["enabled"] else 0
    callbacks = [LogLines(run.log if rt.is_main else None, every, board),
                 Checkpointing(run.checkpoints(name), tcfg["checkpoint_every"], run.resume, rt.is_main,
                               tcfg["checkpoint_seconds"])]
    if board:
        callbacks.append(board)
    if monitor and m["enabled"]:
        callbacks.append(Monitor(monitor, m["measure_every"] if m["retention_min"] is None else 0))
    if m["enabled"] and m["gradients"] and every and objective.teachers:  # (every: 0, epoch lines only)
        callbacks.append(GradientSignals(m["gradients_every"]))
    if name == STUDENT and run.on_epoch:
        callbacks.append(EpochHook(run.on_epoch))
    data = data or run.data
    info = Trainer(log_name(name), objective, data, run.data_cfg(name), tcfg, callbacks, rt,
                   task=task_for(data, run.cfg)).fit()
    monitoring = [cb for cb in callbacks if isinstance(cb, (Monitor, GradientSignals))]
    if monitoring:  # (what the monitor cost this run, beside train_time_s)
        info["monitor_s"] = round(sum(cb.seconds for cb in monitoring), 3)
    return info


def distil(run: RunDir, name: str, model: nn.Module, teacher: nn.Module, mode: str,
           data: Optional[DataBundle] = None, react: bool = False, dcfg: Optional[Dict[str, Any]] = None,
           tcfg: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train `model` as stage `name` by distillation from `teacher` (the student, an assistant, or a compress
    fine-tune); returns the trainer's info. Each epoch logs knowledge retention (linear CKA, cosine after the
    projectors) and input-gradient consistency, teacher vs model on a fixed validation probe; with `react`,
    the recipe's monitor rule may also adjust the distillation strength."""
    dcfg = dcfg or distill_settings(run)
    rt = run.runtime
    teacher.to(rt.device)
    if labels_only(dcfg):  # (sequence-level KD: the teacher's knowledge is in the data; no outputs needed)
        run.event(f"{name}: distill.alpha is 0 with no feature or on-policy term: trained on its data alone, the "
                  f"teacher is not consulted", teacher_outputs="none")
        source = None
    else:
        source = teacher_source(run, teacher, mode, data=data, dcfg=dcfg, name=name)
    t_shapes, s_shapes = feature_shapes(run, teacher, model, dcfg)
    objective = Objective(model, dcfg, source, t_shapes, s_shapes, runtime=rt,
                          n_train=len((data or run.data).y_train))
    monitor, t0 = None, time.perf_counter()
    if run.cfg["monitor"]["enabled"]:
        x, y = run.data.probe(PROBE)
        monitor = retention_monitor(teacher, model.to(rt.device), rt.put(x),
                                    [(f["teacher"], f["student"]) for f in dcfg["features"]], objective.projections(),
                                    rt.put(y) if run.cfg["monitor"]["gradients"] else None)
        if react:
            monitor = with_reaction(monitor, objective, run.cfg["monitor"], run.echo)
    setup_s = time.perf_counter() - t0  # (the teacher's side of the probe, once)
    info = train(run, name, objective, data, monitor, tcfg)
    info.update(train_time_s=round(time.perf_counter() - t0, 3), teacher_outputs=mode)
    if monitor:
        info["monitor_s"] = round(info.get("monitor_s", 0.0) + setup_s, 3)
    return info


# ---------------------------------------------------------------- teacher outputs

def labels_only(dcfg: Dict[str, Any]) -> bool:
    """Whether the distillation objective never reads the teacher's outputs (alpha 0 throughout)."""
    sched = dcfg.get("schedule") or {}
    return (float(dcfg["alpha"]) == 0.0 and sched.get("alpha", "constant") == "constant" and not dcfg["features"]
            and not (dcfg.get("on_policy") or {}).get("fraction"))


def teacher_mode(run: RunDir) -> str:
    """`auto`: cached soft labels, unless augmentation gives new views every epoch (then online)."""
    mode, ddata = run.cfg["distill"]["teacher_outputs"], run.cfg["distill"]["data"]
    if mode == "auto" and run.cfg["distill"]["on_policy"]["fraction"]:
        return "online"  # (the teacher scores what the student writes as it trains)
    if mode == "auto":
        text_online = run.data.variable_length and (
            distill_settings(run)["features"] or (ddata["mask"] and ddata["teacher_sees"] == "noised"))
        mode = "online" if has_augmentation(run.cfg[STUDENT]["augment"]) or text_online else "cached"
    return mode


def soft_labels(run: RunDir, teacher: Optional[nn.Module] = None, data: Optional[DataBundle] = None,
                dcfg: Optional[Dict[str, Any]] = None):
    """Teacher logits (and hooked features) on the un-augmented training inputs, from the on-disk cache (for
    a language model with `distill.topk`, the top-k cache)."""
    teacher, data = teacher or load_saved(run, TEACHER), data or run.data
    if (dcfg or distill_settings(run))["topk"]:
        return topk_labels(run, teacher, data, dcfg or distill_settings(run))
    layers = [f["teacher"] for f in (dcfg or distill_settings(run))["features"]]
    if layers and data.variable_length:
        from ..errors import UserError
        raise UserError("distill.teacher_outputs: cached: text features vary in length per batch and are not "
                        "cached; use teacher_outputs: online (or auto) with transformer layer losses")
    device = run.runtime.device.type
    key = cache_key(weights_sha256(teacher), data.fingerprint, layers, None if device == "cpu" else device)
    memo = run.__dict__.setdefault("soft_label_entries", {})  # the plan's soft-label stage, then the student
    if key in memo:
        return memo[key]
    cache_dir = run.cfg["output"]["cache_dir"] or default_cache_dir()
    teacher.to(run.runtime.device)
    t0 = time.perf_counter()
    outputs, hit = load_or_build(teacher, data.x_train, key, cache_dir, layers, run.cfg["data"]["eval_batch_size"],
                                 run.runtime)
    run.event(f"soft labels: cache {'hit' if hit else 'miss, computed'} ({os.path.join(cache_dir, key)})",
              cache_key=key, hit=hit, seconds=round(time.perf_counter() - t0, 3), samples=len(data.x_train),
              processes=run.runtime.world_size)
    if run.runtime.is_main:
        write_json(run.path("soft_labels.json"), {"cache_key": key, "cache_dir": cache_dir, "layers": layers})
    memo[key] = outputs
    return outputs


def topk_labels(run: RunDir, teacher: nn.Module, data: DataBundle, dcfg: Dict[str, Any]):
    """The teacher's top-k tokens at each position the student learns from, from the on-disk cache: built
    (resumably) when absent, refused when it was built for another tokenizer, teacher or data."""
    from ..models.hf import load_tokenizer, tokenizer_hash
    from ..teachers import topk
    memo = run.__dict__.setdefault("soft_label_entries", {})
    tok = tokenizer_hash(load_tokenizer(data.tokenizer, "data.tokenizer")) if data.tokenizer else \
        sha256_json(data.class_names)[:16]
    want = topk.expected(weights_sha256(teacher), tok, getattr(teacher, "vocab_size", data.num_classes), dcfg["topk"],
                         dcfg["temperature"], data.fingerprint, len(data.y_train))
    key = "topk-" + sha256_json(want)[:24]
    if key in memo:
        return memo[key]
    cache_dir = run.cfg["output"]["cache_dir"] or default_cache_dir()
    t0 = time.perf_counter()
    cache, hit = topk.load_or_build(teacher, data.x_train, data.y_train, os.path.join(cache_dir, key), want,
                                    run.cfg["data"]["eval_batch_size"], run.runtime, run.echo)
    m = cache.manifest
    run.event(f"top-k soft labels: cache {'hit' if hit else 'miss, computed'} ({os.path.join(cache_dir, key)}): "
              f"k={m['k']}, {m['tokens']:,} positions, {m['bytes_per_token']:.0f} bytes per position (dense fp16: "
              f"{m['dense_fp16_bytes_per_token']:,})", cache_key=key, hit=hit, k=m["k"], tokens=m["tokens"],
              bytes_per_token=m["bytes_per_token"], seconds=round(time.perf_counter() - t0, 3))
    if run.runtime.is_main:
        write_json(run.path("soft_labels.json"), {"cache_key": key, "cache_dir": cache_dir, "topk": m["k"],
                                                  "bytes_per_token": m["bytes_per_token"]})
    memo[key] = cache
    return cache


def teacher_source(run: RunDir, teacher: nn.Module, mode: str, quiet: bool = False,
                   data: Optional[DataBundle] = None, dcfg: Optional[Dict[str, Any]] = None,
                   name: str = STUDENT) -> TeacherSource:
    dcfg = dcfg or distill_settings(run)
    if mode == "cached":
        cached = soft_labels(run, teacher, data, dcfg)
        run.event(f"{name}: teacher outputs from the soft-label cache (the teacher is not run while training)",
                  teacher_outputs="cached")
        return cached.source()
    if not quiet:
        run.event(f"{name}: teacher run online on every batch (augmented or noised inputs, feature losses, or a "
                  f"compress fine-tune)", teacher_outputs="online")
    return online_source(teacher, [f["teacher"] for f in dcfg["features"]])


def feature_shapes(run: RunDir, teacher: nn.Module, student: nn.Module, dcfg: Dict[str, Any]):
    """Per-sample output shapes of the hooked layers, from one dry batch (to size the projectors)."""
    feats = dcfg["features"]
    if not feats:
        return {}, {}
    shapes = []
    for model, side in ((teacher, "teacher"), (student, "student")):
        with FeatureCapture(model, [f[side] for f in feats], "distill.features") as cap:
            teacher_forward(model, run.data.x_train[:2].to(model_device(model)), cap)
        shapes.append({k: tuple(v.shape[1:]) for k, v in cap.outputs.items()})
    student.train()
    return shapes[0], shapes[1]


# ---------------------------------------------------------------- the stages

def base_inputs(run: RunDir, role: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """What every trained stage depends on. The device counts (a GPU rounds differently) once it is not the CPU,
    so runs made on the CPU keep their fingerprints."""
    device, augment = run.runtime.device.type, run.own_augment(role)
    return {"spec": spec, "train": run.cfg[role]["train"], "data": run.data.fingerprint,
            **({"device": device} if device != "cpu" else {}), **({"augment": augment} if augment else {})}


def train_teacher(run: RunDir) -> nn.Module:
    m, spec = run.cfg[TEACHER], model_spec(run, TEACHER)
    out = artifact(run.cfg, TEACHER, TEACHER)
    holder: Dict[str, nn.Module] = {}

    def make() -> Dict[str, Any]:
        teacher = holder["model"] = build_role(run, TEACHER)
        t0 = time.perf_counter()
        loaded = m["checkpoint"] or (m["hf"] if m["finetuned"] else None)
        if loaded:
            run.event(f"teacher: loaded from {loaded} (not retrained)", model=TEACHER)
            info: Dict[str, Any] = {"loaded_from": loaded}
        else:
            info = train(run, TEACHER, Objective(teacher, runtime=run.runtime))
        info["train_time_s"] = round(time.perf_counter() - t0, 3)
        save_role(run, teacher, TEACHER, TEACHER, spec, info)
        return info
    record = run_stage(run, Stage(TEACHER, {**base_inputs(run, TEACHER, spec), "checkpoint": sha256_file(
        m["checkpoint"]) if m["checkpoint"] else None}, [out], make))
    return load_saved(run, TEACHER) if record["reused"] else holder["model"]


def student_inputs(run: RunDir, teacher: nn.Module) -> Dict[str, Any]:
    """What both students depend on: their spec, budget and data, their initial weights."""
    s, spec = run.cfg[STUDENT], model_spec(run, STUDENT)
    from_finetuned = bool(s["from_teacher"] and s["from_teacher"]["source"] == "finetuned")
    return {**base_inputs(run, STUDENT, spec), "init": sha256_file(s["checkpoint"]) if s["checkpoint"] else None,
            "init_teacher": weights_sha256(teacher) if from_finetuned else None}


def train_scratch(run: RunDir, teacher: nn.Module) -> Dict[str, Any]:
    """The student's architecture trained on the labels alone, from the same init and budget."""
    spec = model_spec(run, STUDENT)

    def make() -> Dict[str, Any]:
        scratch = build_role(run, STUDENT)
        t0 = time.perf_counter()
        info = train(run, SCRATCH, Objective(scratch, runtime=run.runtime))
        info["train_time_s"] = round(time.perf_counter() - t0, 3)
        save_role(run, scratch, STUDENT, SCRATCH, spec, info)
        return info
    return run_stage(run, Stage(SCRATCH, student_inputs(run, teacher), [artifact(run.cfg, STUDENT, SCRATCH)], make))


def student_data(run: RunDir, teacher: nn.Module, name: str) -> Tuple[DataBundle, Dict[str, int]]:
    """What a distilled model trains on: the labelled training split, plus the inputs the teacher alone
    labels (label -1): the training inputs without labels (`data.label_fraction`) and, for text, the
    augmented copies and unlabeled texts of `distill.data`."""
    data, added = run.data, {}
    if run.cfg["distill"]["sequence_kd"]["windows"]:
        data, added["teacher_written"] = teacher_written(run, teacher, data)
    elif run.cfg["distill"]["sequence_kd"]["samples"]:
        data, added["teacher_written"] = teacher_completions(run, teacher, data)
    if data.x_unlabelled is not None:
        added["unlabelled"] = len(data.x_unlabelled)
        data = with_teacher_labelled(data, data.x_unlabelled)
    if data.variable_length:
        data, texts = with_augmented_texts(data, run.cfg["distill"]["data"], run.cfg["data"], teacher,
                                           run.cfg[STUDENT]["train"]["seed"])
        added.update(texts)
    if added:
        run.event(f"{name}: {len(data.y_train)} training samples, of which teacher-labelled only: "
                  + ", ".join(f"{v} {k}" for k, v in added.items()), added=added)
    return data, added


def teacher_written(run: RunDir, teacher: nn.Module, data: DataBundle) -> Tuple[DataBundle, int]:
    """Sequence-level KD for a language model (the R1-distill practice): the teacher writes windows of the
    data's length, each continuing the first `prompt` characters of a training window drawn at random, and
    the student trains on them with the teacher's sampled tokens as targets (instead of, or besides, the
    text). A stage of its own (`teacher_samples.safetensors`), so a rerun or another student reuses it."""
    seq, seed = run.cfg["distill"]["sequence_kd"], run.cfg[STUDENT]["train"]["seed"]
    out = "teacher_samples.safetensors"

    def make() -> Dict[str, Any]:
        from safetensors.torch import save_file
        from ..io import atomic_path
        from ..progress import bar
        gen = torch.Generator().manual_seed(seed)
        n, length = seq["windows"], data.x_train.shape[1]
        prompts = data.x_train[torch.randint(0, len(data.x_train), (n,), generator=gen), :seq["prompt"]]
        teacher.to(run.runtime.device)
        t0, rows = time.perf_counter(), []
        for start in bar(range(0, n, 256), desc="teacher writes", unit="batch", show=run.runtime.is_main):
            rows.append(teacher.generate(prompts[start:start + 256].to(model_device(teacher)),
                                         length + 1 - seq["prompt"], seq["temperature"], gen).cpu())
        ids, seconds = torch.cat(rows), time.perf_counter() - t0
        if run.runtime.is_main:
            with atomic_path(run.path(out)) as tmp:
                save_file({"ids": ids.contiguous()}, tmp)
        written = n * (length + 1 - seq["prompt"])
        run.event(f"teacher_samples: {n} windows, {written:,} characters written by the teacher at "
                  f"{written / seconds:,.0f} characters/s", windows=n, tokens_per_s=written / seconds)
        return {"windows": n, "tokens_per_s": round(written / seconds, 1), "seconds": round(seconds, 3)}
    run_stage(run, Stage("teacher_samples", {"teacher": weights_sha256(teacher), "data": data.fingerprint,
                                             "sequence_kd": seq, "seed": seed}, [out], make))
    from safetensors.torch import load_file
    ids = load_file(run.path(out))["ids"]
    x, y = ids[:, :-1], ids[:, 1:]
    if not seq["replace"]:
        x, y = torch.cat([data.x_train, x]), torch.cat([data.y_train, y])
    return with_training_split(data, x, y), len(ids)


TEACHER_COMPLETIONS = "teacher_samples.jsonl"


def teacher_completions(run: RunDir, teacher: nn.Module, data: DataBundle) -> Tuple[DataBundle, int]:
    """Sequence-level KD on prompt/completion data (`distill generate`; the R1-distill practice): the teacher
    completes each training prompt, and each of `sequence_kd.prompts` (prompts with an answer but no written
    solution), `samples` times; a verifier keeps the correct ones, and the student trains on those (instead
    of the gold completions with `replace`, else besides them). A stage of its own, whose generation resumes
    where a killed one stopped (teachers/generate.py)."""
    from ..data.completions import as_arrays, teacher_prompts
    from ..models.hf import load_tokenizer
    from ..tasks.causal_lm import extract, prompts_and_answers
    from ..teachers.generate import generate
    seq, seed = run.cfg["distill"]["sequence_kd"], run.cfg[STUDENT]["train"]["seed"]
    settings = {k: seq[k] for k in ("samples", "temperature", "top_p", "max_new_tokens", "verify", "batch_size")}
    answer = run.cfg["evaluate"]["exact_match"]["answer"]
    inputs = {"teacher": weights_sha256(teacher), "data": data.fingerprint, "settings": settings, "answer": answer,
              "seed": seed, **teacher_prompts_input(run)}

    def make() -> Dict[str, Any]:
        if not hasattr(teacher, "complete"):
            from ..errors import UserError
            raise UserError("distill.sequence_kd.samples: the teacher cannot complete prompts (a Hugging Face causal "
                            "LM can)")
        counts: Dict[str, Any] = {}
        if run.runtime.is_main:  # (one process writes; the others wait for the file)
            tok = load_tokenizer(data.tokenizer, "data.tokenizer")
            prompts, refs = prompts_and_answers(data.x_train, data.y_train)
            answers = [extract(tok.decode(r, skip_special_tokens=True), answer) for r in refs]
            extra, extra_answers = teacher_prompts(run.cfg, data, tok)
            teacher.to(run.runtime.device)
            counts = generate(teacher, tok, prompts + extra, answers + extra_answers, settings, answer,
                              run.path(TEACHER_COMPLETIONS),
                              {"teacher": inputs["teacher"], "data": data.fingerprint, "seed": seed,
                               "prompts_file": inputs.get("teacher_prompts")}, show=True)
            if extra:  # (rows are numbered training prompts first)
                kept = read_jsonl(run.path(TEACHER_COMPLETIONS))
                counts["kept_of_extra"] = sum(r["row"] >= len(prompts) for r in kept)
            run.event(f"teacher_samples: {counts['kept']} of {counts['generated']} completions kept "
                      f"({counts['truncated']} truncated, {counts['wrong']} wrong) at "
                      f"{counts['tokens_per_s'] or 0:,.0f} tokens/s"
                      + (f"; {counts['kept_of_extra']} of the kept are for the {len(extra)} prompts of "
                         f"distill.sequence_kd.prompts" if extra else ""), **counts)
        return counts
    run_stage(run, Stage("teacher_samples", inputs, [TEACHER_COMPLETIONS], make))
    rows = read_jsonl(run.path(TEACHER_COMPLETIONS))
    if not rows:
        from ..errors import UserError
        raise UserError(f"{run.path(TEACHER_COMPLETIONS)}: the teacher wrote no completion that was kept (none "
                        f"ended within max_new_tokens, or none was verified correct); nothing to train on")
    x, y = (torch.from_numpy(a) for a in as_arrays([(r["prompt_ids"], r["completion_ids"]) for r in rows],
                                                   data.pad_id))
    if not seq["replace"]:
        width = max(x.shape[1], data.x_train.shape[1])
        pad = lambda a, v: torch.nn.functional.pad(a, (0, width - a.shape[1]), value=v)  # noqa: E731
        x, y = torch.cat([pad(data.x_train, data.pad_id), pad(x, data.pad_id)]), torch.cat([pad(data.y_train, -100),
                                                                                          pad(y, -100)])
    return with_training_split(data, x, y), len(rows)


def teacher_prompts_input(run: RunDir) -> Dict[str, Any]:
    """The hash of the `distill.sequence_kd.prompts` file, for the fingerprints of the stages that depend on
    it (the teacher's samples, and the distilled student and assistants trained on them; not the scratch
    student): an edited file is a new input."""
    from ..data.completions import teacher_prompts_file
    path = teacher_prompts_file(run.cfg) if run.cfg["distill"]["sequence_kd"]["samples"] else None
    return {"teacher_prompts": sha256_file(path)} if path else {}


def read_jsonl(path: str) -> list:
    import json
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_distilled(run: RunDir, teacher: nn.Module) -> Dict[str, Any]:
    """The distilled student, from `teacher` (the last generation before it)."""
    dcfg, spec = distill_settings(run), model_spec(run, STUDENT)
    mode = teacher_mode(run)
    # the monitor's reaction changes training; its other keys only change what is logged
    reaction = {k: run.cfg["monitor"][k] for k in ("retention_min", "watch", "action", "factor")}
    if not run.cfg["monitor"]["enabled"]:
        reaction = {"enabled": False}  # monitor: off -> no reaction either

    def make() -> Dict[str, Any]:
        student = build_role(run, STUDENT)
        data, added = student_data(run, teacher, STUDENT)
        info = distil(run, STUDENT, student, teacher, mode, data, react=True)
        info["added"] = added
        save_role(run, student, STUDENT, STUDENT, spec, info)  # the projectors stay behind in the objective
        return info
    inputs = {**student_inputs(run, teacher), "distill": dcfg, "mode": mode, "teacher": weights_sha256(teacher),
              "monitor": reaction, **teacher_prompts_input(run)}
    return run_stage(run, Stage(STUDENT, inputs, [artifact(run.cfg, STUDENT, STUDENT)], make))


def train_assistant(run: RunDir, i: int, spec: Dict[str, Any], teacher: nn.Module) -> nn.Module:
    """Assistant i+1, distilled from `teacher` (the previous generation) like the student is."""
    name, mode = chain.names(run.cfg)[i], teacher_mode(run)
    holder: Dict[str, nn.Module] = {}

    def make() -> Dict[str, Any]:
        model = holder["model"] = chain.build(run, i, spec)
        run.event(f"{name}: {count_params(model):,} parameters, distilled from "
                  f"{'the teacher' if i == 0 else chain.names(run.cfg)[i - 1]}", model=name, spec=spec)
        data, _ = student_data(run, teacher, name)
        info = distil(run, name, model, teacher, mode, data)  # (its retention is logged against its own teacher)
        info["params"] = count_params(model)
        save_role(run, model, STUDENT, name, spec, info)
        return info
    inputs = {**base_inputs(run, STUDENT, spec), "distill": distill_settings(run), "mode": mode,
              "teacher": weights_sha256(teacher), **teacher_prompts_input(run)}
    record = run_stage(run, Stage(name, inputs, [f"{name}.safetensors"], make))
    return load_saved(run, name) if record["reused"] else holder["model"]


def train_assistants(run: RunDir, teacher: nn.Module) -> nn.Module:
    """Each assistant from the one before; returns the last generation before the student (the teacher
    itself when the recipe has none)."""
    prev = teacher
    for i, spec in enumerate(chain.specs(run)):
        prev = train_assistant(run, i, spec, prev)
    return prev

