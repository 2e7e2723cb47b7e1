"""The recipe's schema: every key with its type, default and range, and the validator that fills the
defaults in, refuses unknown keys and checks each value on its own (recipe_checks.py holds the rules that
involve several keys; recipe.py reads the YAML and applies both)."""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

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


def cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def at_most_cores(least: int) -> Callable[[Any], Optional[str]]:
    """More worker processes or threads than cores only thrash (thousands start thousands of processes)."""
    def check(v: Any) -> Optional[str]:
        if v < least:
            return f"must be >= {least}"
        n = cores()
        return None if v <= n else f"more than the {n} CPU cores this machine gives the run"
    return check


def regex(v: Any) -> Optional[str]:
    try:
        re.compile(v)
    except re.error as e:
        return f"not a regular expression ({e})"
    return None


def seed_range(v: Any) -> Optional[str]:
    return None if 0 <= v < 2 ** 32 else "a seed is between 0 and 2**32 - 1 (what numpy and torch take)"


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
    "seed": F((int,), 0, seed_range),
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
    "timeout_s": F(NUM, 120.0, lambda v: None if 0 < v <= 1e9 else "must be > 0 and <= 1e9 seconds"),
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
        # how often the lr moves: once an epoch (torchvision's and torchdistill's image recipes) or every step
        # (Hugging Face, torchtune, nanoGPT: language models, and any run of one or two epochs)
        "interval": F((str,), "epoch", choices=("epoch", "step")),
        "warmup_epochs": F((int,), 0, non_negative),
        # and a linear warm-up over the first steps (transformers trained from scratch need one: full-rate Adam
        # steps at the start set a from-scratch GPT back by hundreds of steps)
        "warmup_steps": F((int,), 0, non_negative),
        "milestones": F((list,), []),
        "gamma": F(NUM, 0.1, positive),
    },
}

TRANSFORMS = {
    "normalize": F((bool,), True),
    "random_crop": F((int,), 0, non_negative),  # pixels a random crop shifts by, padded with the mean, per sample
    "hflip": F((bool,), False),
}
AUGMENT = {k: v for k, v in TRANSFORMS.items() if k != "normalize"}  # what a model may set for itself (`augment`)

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
    # per-model overrides of data.transforms' augmentation (random_crop, hflip), e.g. a teacher that trains on
    # shifted views while the students see the images as they are; normalisation is the data's, for all models
    "augment": F((dict,), {}),
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
        "split_seed": F((int,), 0, seed_range),
        "batch_size": F((int,), 64, positive),
        "eval_batch_size": F((int,), 512, positive),
        "workers": F((int,), 0, at_most_cores(0)),
        "transforms": TRANSFORMS,
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
            # more prompts for the teacher, whose completions nobody wrote (the R1 practice: a final answer is
            # cheap to check, a worked solution dear to write): a JSONL of {prompt} or {messages} rows, each with
            # the `answer` the verifier checks (what the answer regex finds); for data.dataset: arith, a count
            # of generated problems instead
            "prompts": F((str, int), None),
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
        "threads": F((int,), 1, at_most_cores(1)),
        "throughput_batch": F((int,), 32, positive),
        # language models on prompt/completion data: greedy completions of the first `rows` test prompts, the
        # answer taken by the regex `answer` (its first group; none: the whole completion) against the reference's
        "exact_match": {
            "rows": F((int,), 0, non_negative),
            "max_new_tokens": F((int,), 128, positive),
            "answer": F((str,), None, regex),
            # also score the first `rows` validation prompts after each epoch (val_exact_match, which
            # train.select_metric may select by: a task metric, not the loss alone)
            "validate": F((bool,), False),
        },
    },
    # Knowledge retention (linear CKA and cosine, teacher vs student, on a validation probe) and gradient
    # consistency are logged at epoch ends (see measure_every); when retention falls under retention_min,
    # `action` adjusts the distillation strength (each change logged).
    "monitor": {  # `monitor: off` switches every signal (and the step lines) off
        "enabled": F((bool,), True),
        "retention_min": F(NUM, None, unit_interval),
        "watch": F((str,), "mean", choices=("mean", "logits")),  # the mean over logits and layer pairs, or logits
        "action": F((str,), "warn", choices=("warn", "raise_feature_weight", "lower_temperature", "raise_alpha")),
        "factor": F(NUM, 1.5, positive),  # weight x factor, T / factor (not under 1), alpha x factor (not over 1)
        "every": F((int,), 10, non_negative),  # a log line every N training steps (0: epoch lines only)
        "gradients": F((bool,), True),  # gradient consistency: input gradients per epoch, KD vs CE below
        # KD-vs-CE parameter gradients every N steps (each costs two more backward passes: with 100, the whole
        # monitor is about 3% of training time; benchmarks/kd_speed.py and monitor_cost.py measure it)
        "gradients_every": F((int,), 100, positive),
        # retention and input gradients are measured at the end of each epoch in which the step count passes a
        # multiple of this (0: every epoch): every epoch once an epoch has this many steps, every few epochs of
        # tiny ones (where measuring every epoch would cost more than 5% of training); every epoch with
        # retention_min set, since the reaction reads them
        "measure_every": F((int,), 50, non_negative),
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
    "output": {  # (an empty path would silently mean the default: refused)
        "dir": F((str,), None, lambda v: None if v.strip() else "empty; give a folder, or leave the key out"),
        "cache_dir": F((str,), None, lambda v: None if v.strip() else "empty; give a folder, or leave the key out"),
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
    if v is None:  # (null, or a key written with no value)
        if f.default is None or type(None) in f.types:
            return None  # optional: null means unset
        if isinstance(f.default, (dict, list)) and not f.default:
            return copy.deepcopy(f.default)  # an empty `args:` means none
        raise UserError(f"{path}: null (or no value); give one, or leave the key out for its default "
                        f"{f.default!r}")
    if float in f.types and isinstance(v, str) and FLOAT_TEXT.fullmatch(v.strip()):
        v = float(v)  # YAML 1.1 reads 1e-4 (no dot) as a string; it means the number
    ok = isinstance(v, f.types) and not (isinstance(v, bool) and bool not in f.types)
    if not ok:
        names = " or ".join("number" if t is float else t.__name__ for t in f.types if not (t is int and float in f.types))
        raise UserError(f"{path}: expected {names}, got {type(v).__name__} {v!r}")
    _refuse_non_finite(v, path)
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2 ** 53:
        raise UserError(f"{path}: {v} is out of range for any setting")
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


COMPLETIONS = ("completions", "arith")
LM_DATASETS = ("text_lm", *COMPLETIONS)

COMPRESS_STEPS = ("vocab", "layers", "heads", "channels", "qat")
BENCH_VARIANTS = ("fp32", "dynamic", "static", "fp16", "bf16", "onnx", "onnx_dynamic", "onnx_static", "torchao",
                  "pt2e")
