"""The stages that train a model, each through the one stage mechanism and the one trainer:

    teacher          trained on the labels, or loaded (not retrained)
    assistant_<i>    distilled from the generation before it (teacher-assistant chains)
    student_scratch  the student's architecture on the labels alone, same init and budget (the baseline)
    student          distilled from the last generation before it

A distilled model learns from its teacher's outputs (teacher_outputs.py): cached soft labels when the inputs are
the same every epoch, else the teacher run online on each batch; and from the data the teacher writes.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

from torch import nn

from .. import chain
from ..data import DataBundle
from ..engine.callbacks import Checkpointing, EpochHook, GradientSignals, LogLines, Monitor, TensorBoard
from ..engine.inference import model_device
from ..engine.objective import Objective
from ..engine.trainer import Trainer
from ..hooks import FeatureCapture
from ..io import model_sha256, sha256_file, weights_sha256
from ..models import count_params
from ..monitor import retention_monitor, with_reaction
from ..recipe_checks import labels_only, loaded_teacher
from ..roles import SCRATCH, STUDENT, TEACHER, log_name
from ..tasks import task_for
from ..teachers import teacher_forward
from .artifacts import artifact, build_role, distill_settings, load_saved, model_spec, save_role
from .rundir import RunDir, check_run
from .stage import Stage, run_stage
from .teacher_outputs import student_data, teacher_mode, added_files_input, teacher_source

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
    if m["enabled"] and m["gradients"] and objective.teachers:  # (every: 0, in the epoch lines only)
        callbacks.append(GradientSignals(m["gradients_every"]))
    if name == STUDENT and run.on_epoch:
        callbacks.append(EpochHook(run.on_epoch))
    data = data or run.data_for(name)
    trainer = Trainer(log_name(name), objective, data, run.data_cfg(name), tcfg, callbacks, rt,
                      task=task_for(data, run.cfg))
    info = trainer.fit()
    if any(isinstance(cb, (Monitor, GradientSignals)) for cb in callbacks):  # (its cost, beside train_time_s)
        info["monitor_s"] = round(trainer.prog.get("monitor_s", 0.0), 3)
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
    if run.data.task == "causal_lm":
        _fits_contexts(name, model, teacher, data or run.data_for(name), dcfg)
    teacher.to(rt.device)
    if labels_only(dcfg):  # (sequence-level KD: the teacher's knowledge is in the data; no outputs needed)
        run.event(f"{name}: distill.alpha is 0 with no feature or on-policy term: trained on its data alone, the "
                  f"teacher is not consulted", teacher_outputs="none")
        source = None
    else:
        source = teacher_source(run, teacher, mode, data=data, dcfg=dcfg, name=name)
    t_shapes, s_shapes = feature_shapes(run, teacher, model, dcfg)
    objective = Objective(model, dcfg, source, t_shapes, s_shapes, runtime=rt,
                          n_train=len((data or run.data_for(name)).y_train))
    monitor, t0 = None, time.perf_counter()
    if run.cfg["monitor"]["enabled"] and run.data_for(name) is run.data:  # (retention: both read the same inputs)
        x, y = run.data.probe(PROBE)
        monitor = retention_monitor(teacher, model.to(rt.device), rt.put(x),
                                    [(f["teacher"], f["student"]) for f in dcfg["features"]], objective.projections(),
                                    rt.put(y) if run.cfg["monitor"]["gradients"] else None)
        if react:
            monitor = with_reaction(monitor, objective, run.cfg["monitor"], run.echo)
    setup_s = time.perf_counter() - t0  # (the teacher's side of the probe, once)
    info = train(run, name, objective, data, monitor, tcfg)
    info.update(train_time_s=_seconds(t0, info), teacher_outputs=mode)
    if monitor:
        info["monitor_s"] = round(info.get("monitor_s", 0.0) + setup_s, 3)
    return info


def _fits_contexts(name: str, model: nn.Module, teacher: nn.Module, data: DataBundle, dcfg: Dict[str, Any]) -> None:
    """A language model with a table of learnt positions reads no row longer than it: the rows the teacher
    wrote (sequence-level KD), and the student's own samples that the teacher scores (on-policy), are checked
    before training, not met as an index error in its middle."""
    from ..errors import UserError
    from ..tasks.causal_lm import prompts_and_answers
    from .artifacts import fits_context
    fits_context(model, data.x_train.shape[1], "distill.sequence_kd", name, "(the teacher's completions longer "
                 "than that are left out)")
    steps, context = (dcfg.get("on_policy") or {}).get("max_new_tokens"), getattr(teacher, "context", None)
    if (dcfg.get("on_policy") or {}).get("fraction") and context is not None:
        longest = max(len(p) for p in prompts_and_answers(data.x_train, data.y_train)[0])
        if longest + steps - 1 > context:
            raise UserError(f"distill.on_policy.max_new_tokens: {steps} new tokens after prompts of up to {longest}, "
                            f"and the teacher reads at most {context} positions (its table of learnt positions); "
                            f"give at most {context - longest + 1}")


def _seconds(t0: float, info: Dict[str, Any]) -> float:
    """A stage's training time: this attempt's since `t0`, and a resumed one's earlier attempts (up to the
    checkpoint it resumed from)."""
    return round(time.perf_counter() - t0 + info.pop("earlier_s", 0.0), 3)


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
    return {"spec": spec, "train": _train_inputs(run.cfg[role]["train"]), "data": run.data_for(role).fingerprint,
            **({"device": device} if device != "cpu" else {}), **({"augment": augment} if augment else {})}


def waitless(tcfg: Dict[str, Any]) -> Dict[str, Any]:
    """The train settings with timeout_s (how long a process waits for the others, which leaves the model as it
    is) read as its default: raising it retrains nothing and does not refuse --resume. A value equal to the
    default is kept as written, so those folders keep their fingerprints."""
    from ..recipe_schema import SCHEMA
    default = SCHEMA["train"]["timeout_s"].default
    return {**tcfg, "timeout_s": default} if tcfg.get("timeout_s", default) != default else tcfg


def _train_inputs(tcfg: Dict[str, Any]) -> Dict[str, Any]:
    """The train settings, less `scheduler.interval` at its default (the key came later: runs made before it
    keep their fingerprints, and their teachers are not retrained), and with `waitless` timeout_s."""
    tcfg = waitless(tcfg)
    if tcfg["scheduler"].get("interval", "epoch") != "epoch":
        return tcfg
    return {**tcfg, "scheduler": {k: v for k, v in tcfg["scheduler"].items() if k != "interval"}}


def train_teacher(run: RunDir) -> nn.Module:
    m, spec = check_run(run, "train_teacher").cfg[TEACHER], model_spec(run, TEACHER)
    out = artifact(run.cfg, TEACHER, TEACHER)
    holder: Dict[str, nn.Module] = {}

    def make() -> Dict[str, Any]:
        teacher = holder["model"] = build_role(run, TEACHER)
        t0 = time.perf_counter()
        loaded = loaded_teacher(run.cfg)
        if loaded:
            run.event(f"teacher: loaded from {loaded} (not retrained)", model=TEACHER)
            info: Dict[str, Any] = {"loaded_from": loaded}
        else:
            info = train(run, TEACHER, Objective(teacher, runtime=run.runtime))
        info["train_time_s"] = _seconds(t0, info)
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
        info["train_time_s"] = _seconds(t0, info)
        save_role(run, scratch, STUDENT, SCRATCH, spec, info)
        return info
    return run_stage(run, Stage(SCRATCH, student_inputs(run, teacher), [artifact(run.cfg, STUDENT, SCRATCH)], make))



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
    inputs = {**student_inputs(run, teacher), "distill": dcfg, "mode": mode, "teacher": model_sha256(teacher),
              "monitor": reaction, **added_files_input(run)}
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
              "teacher": model_sha256(teacher), **added_files_input(run)}
    record = run_stage(run, Stage(name, inputs, [f"{name}.safetensors"], make))
    return load_saved(run, name) if record["reused"] else holder["model"]


def train_assistants(run: RunDir, teacher: nn.Module) -> nn.Module:
    """Each assistant from the one before; returns the last generation before the student (the teacher
    itself when the recipe has none)."""
    prev = teacher
    for i, spec in enumerate(chain.specs(run)):
        prev = train_assistant(run, i, spec, prev)
    return prev

