"""The plan: a recipe's stages in order, and the one way to execute them.

    teacher -> assistant_1 ... -> [soft labels] -> student_scratch -> student -> evaluate -> compress steps

`distill run`, the stage commands, `distill search` (each trial) and `distill compress` all execute this plan,
each selecting the kinds of stage it runs; a stage left out that a later one needs (the teacher of the
student, say) is loaded from the run folder instead. Before anything is written, `preflight` builds the
models and takes one distillation step on two samples per link, so that a mistake the recipe validator
cannot see (a layer shape, a feature name, a checkpoint of another architecture) stops the run with no
half-made run folder.
"""
from __future__ import annotations

import copy
import functools
import numbers
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import chain
from ..checkpoint import rng_state, set_rng_state
from ..data import has_augmentation
from ..engine.objective import Objective
from ..engine.runtime import refuse_beyond_memory
from ..launch import is_main_process
from ..engine.trainer import TrainingDiverged
from ..errors import UserError
from ..evaluate import mean_std
from ..tasks import task_for
from ..io import write_json
from ..recipe import Recipe
from ..teachers.cache import check_cache_dir
from ..roles import SCRATCH, STUDENT, TEACHER
from .artifacts import artifact, build_role, distill_settings, fits_context, load_saved, resolve_distill
from .evaluation import evaluate
from .rundir import (RunDir, check_recipe, check_run, refuse_inside_a_run, refuse_other_records, run_folder,
                     seed_folder)
from . import teacher_outputs, training
from .teacher_outputs import student_data, teacher_mode, teacher_source
from .training import feature_shapes, train_assistant, train_distilled, train_scratch

KINDS = ("teacher", "assistant", "generate", "soft_labels", "baseline", "student", "evaluate", "compress")
TRAINING = ("teacher", "assistant", "generate", "soft_labels", "baseline", "student")


@dataclass
class Step:
    name: str  # the stage (a role, soft_labels, evaluate, compress/<step>)
    kind: str  # one of KINDS
    teacher: Optional[str] = None  # the model it learns from
    index: int = 0  # assistants: position in the chain; compress: position in compress.steps


def plan(cfg: Dict[str, Any]) -> List[Step]:
    """The stages of a recipe, in order."""
    steps, prev = [Step(TEACHER, "teacher")], TEACHER
    for i, name in enumerate(chain.names(cfg)):  # teacher-assistant chains add a link each
        steps.append(Step(name, "assistant", prev, i))
        prev = name
    seq = cfg["distill"]["sequence_kd"]
    if seq["windows"] or seq["samples"]:  # sequence-level KD: the teacher writes the student's training data
        steps.append(Step("teacher_samples", "generate", prev))
    steps.append(Step("soft_labels", "soft_labels", prev))
    if cfg["baseline"]:
        steps.append(Step(SCRATCH, "baseline", TEACHER))
    steps += [Step(STUDENT, "student", prev), Step("evaluate", "evaluate")]
    steps += [Step(f"compress/{s}", "compress", cfg["compress"]["source"], i)
              for i, s in enumerate(cfg["compress"]["steps"])]
    return steps


class Execution:
    """The models and stage records of one execution of the plan."""

    def __init__(self, run: RunDir, kinds: Sequence[str] = KINDS) -> None:
        self.run, self.models, self.records, self.loaded = run, {}, {}, []
        self.soft_labels_asked = "soft_labels" in kinds and "student" not in kinds  # `distill soft-labels`
        self.soft_labels = None  # what `distill soft-labels` made (None: the student runs the teacher online)

    def model(self, name: str) -> nn.Module:
        """A model this execution trained, or the folder's."""
        if name not in self.models:
            self.models[name] = load_saved(self.run, name)
            self.loaded.append(name)
        return self.models[name]

    def do(self, step: Step) -> None:
        self._do(step)
        while self.loaded:  # (a stage command built on the folder's model: it is this recipe's now; marked once)
            self.run.mark_reused(self.loaded.pop())

    def _do(self, step: Step) -> None:
        run = self.run
        if step.kind == "teacher":
            self.models[TEACHER] = training.train_teacher(run)
        elif step.kind == "assistant":
            self.models[step.name] = train_assistant(run, step.index, chain.specs(run)[step.index],
                                                     self.model(step.teacher))
        elif step.kind == "generate":
            student_data(self.run, self.model(step.teacher), "teacher_samples")
        elif step.kind == "soft_labels":  # (in a full run the student's stage reads them itself, when it trains)
            if self.soft_labels_asked and teacher_mode(run) != "cached":
                run.event("soft labels: none to cache: this recipe's student runs the teacher online (augmented or "
                          "noised inputs, text feature losses, or on-policy samples)", teacher_outputs="online")
            elif self.soft_labels_asked:  # on the inputs the student trains on (teacher-labelled ones included)
                teacher = self.model(step.teacher)
                self.soft_labels = teacher_outputs.soft_labels(run, teacher,
                                                               student_data(run, teacher, "soft labels")[0])
                self.records["soft_labels"] = run.path("soft_labels.json")
        elif step.kind == "baseline":
            self.records[SCRATCH] = train_scratch(run, self.model(TEACHER))
        elif step.kind == "student":
            self.records[STUDENT] = train_distilled(run, self.model(step.teacher))
        elif step.kind == "evaluate":
            self.records["metrics"] = evaluate(run)


def execute(run: RunDir, kinds: Sequence[str] = KINDS[:-1], check: bool = True,
            teacher: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Run the plan's stages of `kinds` in order (`check`: preflight first; `teacher`: the teacher already in
    memory, else it is trained or read from the folder); returns the students' stage records and, when
    evaluated, the metrics. A user mistake found before any stage finished leaves no run folder behind."""
    return _execution(run, kinds, check, teacher).records


def _execution(run: RunDir, kinds: Sequence[str], check: bool = True, teacher: Optional[nn.Module] = None
               ) -> Execution:
    existed = os.path.isdir(run.out)
    try:
        if teacher is not None:
            check_given_teacher(run, teacher)
        if check:
            preflight(run, saved_teacher=teacher is None and "teacher" not in kinds, given=teacher)
        ex = Execution(run, kinds)
        if teacher is not None:
            ex.models[TEACHER] = teacher
        for step in plan(run.cfg):
            if step.kind in kinds and step.kind != "compress":
                ex.do(step)
        if "compress" in kinds:  # (its steps chain their models: one compressor runs them in order)
            from ..compress.pipeline import compress
            ex.records["compress"] = compress(run, ex.model(TEACHER), ex.model(run.cfg["compress"]["source"]))
        return ex
    except UserError as e:
        if not existed and not isinstance(e, TrainingDiverged) and not run.stages() \
                and is_main_process():  # (under torchrun: the main process cleans up)
            shutil.rmtree(run.out, ignore_errors=True)  # nothing finished: no half-made run folder
        raise


def _check_augmentation(run: RunDir) -> None:
    """random_crop and hflip shift and mirror images: refused for any model whose inputs are not images, and
    a shift as large as the image (it pads by as much: 100000 pixels asked for 320 GB)."""
    for role in (TEACHER, STUDENT):
        augment = run.data_cfg(role)["transforms"]
        key = f"{role}.augment" if run.own_augment(role) else "data.transforms"
        if has_augmentation(augment) and not run.data.image:
            raise UserError(f"{key}: random_crop and hflip augment images, and these inputs are not images "
                            f"(each is shaped {tuple(run.data.input_shape)}); remove them")
        if run.data.image and augment["random_crop"] >= min(run.data.input_shape[1:]):
            raise UserError(f"{key}.random_crop: {augment['random_crop']} pixels of shift, on images of "
                            f"{'x'.join(map(str, run.data.input_shape[1:]))}; give fewer than the image's side "
                            f"(CIFAR uses 4 on 32)")
    texts, views = run.cfg["distill"]["data"], run.data_cfg(STUDENT)["transforms"]
    if run.cfg["distill"]["teacher_outputs"] == "cached" and (has_augmentation(views) or (
            texts["mask"] and texts["teacher_sees"] == "noised")):
        what = ("shifted or mirrored views" if has_augmentation(views) else "noised texts the teacher is to see")
        raise UserError(f"distill.teacher_outputs: cached soft labels are the teacher's on the training inputs as "
                        f"they are, and the student learns from {what} (each batch new): the targets would belong "
                        f"to other inputs; use online (or auto, which chooses it)")
    if texts["substitute"]:
        from ..data.augment_text import check_neighbours
        check_neighbours(texts["neighbours"], run.cfg["data"]["tokenizer"])
    for key in ("substitute", "eda"):  # copies of every training text, as token ids (int64)
        if texts[key] and run.data.variable_length:
            x = run.data.x_train
            refuse_beyond_memory(f"distill.data.{key}: {texts[key]:,} copies of {len(x):,} texts of "
                                 f"{x.shape[1]} tokens", texts[key] * x.numel() * 8)


def _check_teacher_prompts(run: RunDir) -> None:
    """A bad `distill.sequence_kd.prompts` file is refused on every process before the teacher is trained, not
    by the one that generates, after it."""
    if run.cfg["distill"]["sequence_kd"]["prompts"] is not None:  # (the recipe has checked samples > 0)
        from ..data.completions import teacher_prompts
        from ..models.hf import load_tokenizer
        for data in [run.data] + ([run.data_for(STUDENT)] if run.student_tokenizer else []):  # (the student's too)
            teacher_prompts(run.cfg, data, load_tokenizer(data.tokenizer, "data.tokenizer"))


def _check_unlabeled(run: RunDir, models: Sequence[nn.Module]) -> None:
    """`distill.data.unlabeled` is read when the student's data is made, after the teacher has trained: read
    (and tokenised, into the token cache) once here, so that a bad file, a held-out text or one longer than
    the models read is refused first."""
    path, cfg = run.cfg["distill"]["data"]["unlabeled"], run.cfg["data"]
    if path:
        from ..data.augment_text import not_held_out
        from ..data.text import tokenize_file
        from ..models.hf import load_tokenizer
        data = run.data_for(STUDENT)
        ids = not_held_out(tokenize_file(path, cfg, load_tokenizer(cfg["tokenizer"], "data.tokenizer"),
                                         labelled=False)[0], data, path)
        longest = int((ids != data.pad_id).sum(1).max())
        for name, model in zip((TEACHER, STUDENT), models):
            fits_context(model, longest, path, name, "to cut texts there")


def _warn_held_out_prompts(run: RunDir) -> None:
    """A prompt written twice in a completions file (two completions of one problem) can be split into training
    and into validation or test: the held-out score then counts a problem the models trained on."""
    from ..recipe_schema import COMPLETIONS
    from ..tasks.causal_lm import prompts_and_answers
    if run.cfg["data"]["dataset"] not in COMPLETIONS or not run.runtime.is_main:
        return
    data = run.data
    seen = {tuple(p) for p in prompts_and_answers(data.x_train, data.y_train)[0]}
    for split, x, y in (("validation", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        prompts = prompts_and_answers(x, y)[0] if len(y) else []
        both = sum(tuple(p) in seen for p in prompts)
        if both:
            own_file = split == "test" and run.cfg["data"]["test_path"]
            fix = "remove them from one of the two files" if own_file else \
                "give each prompt one row" + (", or a data.test_path" if split == "test" else "")
            run.echo(f"warning: {'data.test_path' if own_file else 'data.path'}: {both} of the {len(prompts)} "
                     f"{split} rows have a prompt that training rows have too (a prompt given twice"
                     f"{'' if own_file else ', split both ways'}): their {split} scores count problems the models "
                     f"trained on; {fix}")


def check_given_teacher(run: RunDir, teacher: Any) -> None:
    """A teacher handed to the Python API stands in for the recipe's: a module that takes this data's inputs
    and scores its classes (or vocabulary), else its soft labels would be cached for another task."""
    if not isinstance(teacher, nn.Module):
        raise UserError(f"teacher: expected a torch.nn.Module, got {type(teacher).__name__}")
    was = teacher.training
    try:
        with torch.no_grad():
            device = next(teacher.parameters(), torch.empty(0)).device
            out = teacher.eval()(run.data.x_train[:2].to(device))
    except Exception as e:  # (any failure of a model the caller built: said in one line, before anything is written)
        raise UserError(f"teacher: the model given does not take this data's inputs of shape "
                        f"{tuple(run.data.x_train.shape[1:])} ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]})") from None
    finally:
        teacher.train(was)
    lm = run.data.task == "causal_lm"  # (a vocabulary may be padded: more rows)
    n = run.data.num_classes
    if not isinstance(out, torch.Tensor) or (out.shape[-1] < n if lm else out.shape[-1] != n):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"teacher: the model given outputs {got} for 2 samples; this data has {n} "
                        f"{'tokens' if lm else 'classes'}, one score each")


def preflight(run: RunDir, saved_teacher: bool = False, given: Optional[nn.Module] = None) -> None:
    """Build the teacher (or take the one `given`), the student and every assistant, and take one distillation
    step on two samples per link of the chain (teacher -> assistants -> student), before anything is written.
    `saved_teacher`: the command builds on the folder's teacher (train-student, generate, soft-labels), which
    must read this data."""
    _check_augmentation(run)
    saved = run.path(artifact(run.cfg, TEACHER, TEACHER))
    if saved_teacher and run.cfg[TEACHER]["model"] == "gpt" and os.path.exists(saved):
        # (the registry GPT's table of learnt positions, shorter than the rows: an IndexError mid-run, after the
        # baseline was trained again; Hugging Face models are checked when built, on the real lengths)
        fits_context(load_saved(run, TEACHER), int(run.data.x_train.shape[1]), saved, "teacher",
                     "(the rows the teacher was trained on), or train the teacher again")
    if teacher_mode(run) == "cached":  # (only where soft labels are cached: an online teacher never writes there)
        check_cache_dir(run.cfg["output"]["cache_dir"])
    _check_teacher_prompts(run)
    teacher, student = given if given is not None else build_role(run, TEACHER), build_role(run, STUDENT)
    _check_unlabeled(run, (teacher, student))
    run.dcfg = resolve_distill(run.cfg, teacher, student)
    if run.runtime.distributed and any(f["loss"] == "crd" for f in run.dcfg["features"]):
        from ..losses.contrastive import ONE_PROCESS  # (the trainer refuses it too: after the teacher trained)
        raise UserError(ONE_PROCESS)
    if run.dcfg.get("topk"):
        from ..teachers.topk import check_k
        check_k(run.dcfg["topk"], getattr(teacher, "vocab_size", run.data.num_classes))
    assistants = [chain.build(run, i, s) for i, s in enumerate(chain.specs(run))]
    chain.check_sizes(run, assistants, teacher, student)
    links = [teacher, *assistants, student]
    data = run.data_for(STUDENT)  # (a student of another tokenizer reads its own tokens, and the teacher's text)
    task = task_for(data)
    batch = task.collate(data, torch.arange(2), run.data_cfg(STUDENT)["transforms"], 0)
    for prev, nxt in zip(links, links[1:]):
        t_shapes, s_shapes = feature_shapes(run, prev, nxt, run.dcfg)
        source = None if data is not run.data else teacher_source(run, prev, "online", quiet=True)
        Objective(nxt, run.dcfg, source, t_shapes, s_shapes, task=task, n_train=len(data.y_train))(
            batch.x, batch.y, batch.idx, batch.mask)
    _warn_held_out_prompts(run)  # (once the run is going ahead: not before a refusal)


def _keeps_callers_rng(fn: Callable) -> Callable:
    """The Python API seeds the global RNGs (Python's, NumPy's, torch's) to train: the caller's states are put
    back after, else a random search written around run() draws the same point every time."""
    @functools.wraps(fn)
    def keeping(*args: Any, **kwargs: Any) -> Any:
        state = rng_state()
        try:
            return fn(*args, **kwargs)
        finally:
            set_rng_state(state)
    return keeping


@_keeps_callers_rng
def run(recipe: Recipe, out: Optional[str] = None, echo: Callable[[str], None] = print, resume: bool = False,
        overwrite: bool = False, tensorboard: bool = False) -> Dict[str, Any]:
    """Every stage up to evaluation; returns the contents of metrics.json. `resume` continues from checkpoints."""
    rd = RunDir(recipe, out, echo, resume=resume, overwrite=overwrite, tensorboard=tensorboard)
    return execute(rd)["metrics"]


# The Python API's stage functions: each runs its part of the plan as its command does, preflight first.

@_keeps_callers_rng
def train_teacher(run: RunDir) -> nn.Module:
    """`distill train-teacher`: the teacher trained (or loaded, or reused from the folder); returns it, in eval
    mode (as a teacher is used: a dropout left on would make its outputs random)."""
    return _execution(check_run(run, "train_teacher"), ("teacher",)).models[TEACHER].eval()


@_keeps_callers_rng
def soft_labels(run: RunDir, teacher: Optional[nn.Module] = None):
    """`distill soft-labels`: the teacher's outputs on the inputs the student trains on (teacher-labelled ones
    included), from the on-disk cache, built when absent; None when this recipe's student runs the teacher
    online (nothing is cached then)."""
    return _execution(check_run(run, "soft_labels"), ("soft_labels",), teacher=teacher).soft_labels


@_keeps_callers_rng
def train_student(run: RunDir, teacher: Optional[nn.Module] = None) -> Dict[str, Any]:
    """`distill train-student`: the students' stages of the plan (through any assistants), the baseline and the
    distilled student, from `teacher` (else the run folder's); returns their stage records."""
    return execute(check_run(run, "train_student"), ("assistant", "generate", "soft_labels", "baseline", "student"),
                   teacher=teacher)


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    cfg = copy.deepcopy(recipe.cfg)
    for section in (cfg["train"], cfg["teacher"]["train"], cfg["student"]["train"]):
        section["seed"] = seed
    return Recipe(cfg, recipe.source)


def summarise_seeds(per_seed: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and std over seeds of each model's numbers (not a fingerprint); a metric a seed left undefined
    (null: AUC of a one-class test split) is left out of its mean, which says over how many seeds it is."""
    seeds = list(per_seed)
    summary: Dict[str, Any] = {"seeds": seeds}
    for name, first in per_seed[seeds[0]].items():  # teacher, students and any assistants
        if first.get("skipped"):
            summary[name] = first
            continue
        summary[name] = {}
        for k in first:
            values = [v for s in seeds if isinstance(v := per_seed[s][name].get(k), (int, float))
                      and not isinstance(v, bool)]
            if values:
                summary[name][k] = {**mean_std(values), **({"seeds": len(values)} if len(values) < len(seeds) else {})}
    return summary


@_keeps_callers_rng
def run_seeds(recipe: Recipe, seeds: List[int], out: Optional[str] = None, echo=print, resume: bool = False,
              overwrite: bool = False, tensorboard: bool = False) -> Dict[str, Any]:
    """One full run per seed in `OUT/seed_<s>`, then mean and std of every metric in `OUT/summary.json`."""
    recipe = check_recipe(recipe)
    given = list(seeds) if hasattr(seeds, "__iter__") and not isinstance(seeds, (str, bytes)) else None
    if not given or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and 0 <= s < 2 ** 32
                            for s in given):
        raise UserError(f"seeds: expected a non-empty list of seeds (whole numbers in 0..2**32 - 1), got {seeds!r:.60}")
    seeds = [int(s) for s in given]  # (numpy's integers too; a generator is read once)
    if len(set(seeds)) < len(seeds):  # (one run counted twice: a std of 0 that measured nothing)
        raise UserError(f"seeds: {seeds} repeats a seed; give each once")
    base = run_folder(recipe, out)
    refuse_inside_a_run(base, "the seeds' folders and summary.json")
    refuse_other_records(base, "seeds")
    # Every seed's folder is checked (another recipe's run in it, say) before the first seed trains.
    folders = {s: RunDir(with_seed(recipe, s), seed_folder(base, s), echo, resume=resume,
                         overwrite=overwrite, tensorboard=tensorboard) for s in seeds}
    summary = summarise_seeds({s: execute(folders[s])["metrics"] for s in seeds})
    if is_main_process():
        write_json(os.path.join(base, "summary.json"), summary)
    return summary


__all__ = ["Step", "plan", "execute", "preflight", "run", "run_seeds", "with_seed", "train_teacher", "train_student",
           "soft_labels", "evaluate", "distill_settings"]
