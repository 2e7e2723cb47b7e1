"""What a distilled model learns from its teacher, produced once and reused by every stage that needs it:

    soft labels      the teacher's logits (and hooked features) on the training inputs: the dense on-disk cache,
                     the top-k cache for a language model (`distill.topk`), or the teacher run online per batch
    teacher data     what the student trains on besides or instead of the labels: windows or completions the
                     teacher writes (sequence-level KD, the `teacher_samples` stage), inputs only it labels,
                     and augmented texts
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..data import DataBundle, has_augmentation
from ..data.augment_text import with_augmented_texts
from ..data.datasets import with_teacher_labelled, with_training_split
from ..engine.batch import TeacherSource
from ..engine.inference import model_device
from ..io import model_sha256, sha256_file, sha256_json, write_json
from ..recipe_schema import SCHEMA
from ..roles import STUDENT, TEACHER
from ..teachers import cache_key, load_or_build, online_source
from ..teachers.cache import check_cache_dir
from .artifacts import distill_settings, load_saved
from .rundir import RunDir, check_run
from .stage import Stage, run_stage


# ---------------------------------------------------------------- soft labels

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
    check_run(run, "soft_labels")
    teacher, data = teacher or load_saved(run, TEACHER), data or run.data
    if (dcfg or distill_settings(run))["topk"]:
        return topk_labels(run, teacher, data, dcfg or distill_settings(run))
    layers = [f["teacher"] for f in (dcfg or distill_settings(run))["features"]]
    if layers and data.variable_length:
        from ..errors import UserError
        raise UserError("distill.teacher_outputs: cached: text features vary in length per batch and are not "
                        "cached; use teacher_outputs: online (or auto) with transformer layer losses")
    key = cache_key(model_sha256(teacher), data.fingerprint, layers, _computed_by(run))
    memo = run.__dict__.setdefault("soft_label_entries", {})  # the plan's soft-label stage, then the student
    if key in memo:
        return memo[key]
    cache_dir = check_cache_dir(run.cfg["output"]["cache_dir"])
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


def _computed_by(run: RunDir) -> Dict[str, Any]:
    """How an entry's outputs were computed, where that changes their last bits: off the CPU the device, and
    a batch size other than the default (a teacher's outputs on the CPU differ in the last bits with it, and
    the entry of one batch size was served to a run of another). Neither is named otherwise, so that entries
    made before the key named them are found."""
    device, batch = run.runtime.device.type, run.cfg["data"]["eval_batch_size"]
    default = SCHEMA["data"]["eval_batch_size"].default
    return {**({"device": device} if device != "cpu" else {}), **({"batch": batch} if batch != default else {})}


def topk_labels(run: RunDir, teacher: nn.Module, data: DataBundle, dcfg: Dict[str, Any]):
    """The teacher's top-k tokens at each position the student learns from, from the on-disk cache: built
    (resumably) when absent, refused when it was built for another tokenizer, teacher or data."""
    from ..models.hf import load_tokenizer, tokenizer_hash
    from ..teachers import topk
    memo = run.__dict__.setdefault("soft_label_entries", {})
    tok = tokenizer_hash(load_tokenizer(data.tokenizer, "data.tokenizer")) if data.tokenizer else \
        sha256_json(data.class_names)[:16]
    want = topk.expected(model_sha256(teacher), tok, getattr(teacher, "vocab_size", data.num_classes), dcfg["topk"],
                         dcfg["temperature"], data.fingerprint, len(data.y_train), _computed_by(run))
    key = "topk-" + sha256_json(want)[:24]
    if key in memo:
        return memo[key]
    cache_dir = check_cache_dir(run.cfg["output"]["cache_dir"])
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


# ---------------------------------------------------------------- data the teacher writes or labels

def student_data(run: RunDir, teacher: nn.Module, name: str) -> Tuple[DataBundle, Dict[str, int]]:
    """What a distilled model trains on: the labelled training split, plus the inputs the teacher alone
    labels (label -1): the training inputs without labels (`data.label_fraction`) and, for text, the
    augmented copies and unlabeled texts of `distill.data`."""
    data, added = run.data_for(name), {}
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
        if not run.runtime.is_main:  # (one process writes; the others wait for the file)
            return {}
        gen = torch.Generator().manual_seed(seed)
        n, length = seq["windows"], data.x_train.shape[1]
        prompts = data.x_train[torch.randint(0, len(data.x_train), (n,), generator=gen), :seq["prompt"]]
        teacher.to(run.runtime.device)
        t0, rows = time.perf_counter(), []
        for start in bar(range(0, n, 256), desc="teacher writes", unit="batch"):
            rows.append(teacher.generate(prompts[start:start + 256].to(model_device(teacher)),
                                         length + 1 - seq["prompt"], seq["temperature"], gen).cpu())
        ids, seconds = torch.cat(rows), time.perf_counter() - t0
        with atomic_path(run.path(out)) as tmp:
            save_file({"ids": ids.contiguous()}, tmp)
        written = n * (length + 1 - seq["prompt"])
        run.event(f"teacher_samples: {n} windows, {written:,} characters written by the teacher at "
                  f"{written / seconds:,.0f} characters/s", windows=n, tokens_per_s=written / seconds)
        return {"windows": n, "tokens_per_s": round(written / seconds, 1), "seconds": round(seconds, 3)}
    run_stage(run, Stage("teacher_samples", {"teacher": model_sha256(teacher), "data": data.fingerprint,
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
    own, data = data, run.data  # the teacher writes in its tokens (run.data); `own`: the student's
    inputs = {"teacher": model_sha256(teacher), "data": data.fingerprint, "settings": settings, "answer": answer,
              "seed": seed, **added_files_input(run)}

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
            missing = sum(a is None for a in answers)
            if settings["verify"] and missing:  # (their prompts' completions can only be dropped as wrong)
                run.event(f"warning: distill.sequence_kd.verify: {missing} of the {len(answers)} training "
                          f"completions have no answer that evaluate.exact_match.answer ({answer}) finds; every "
                          f"teacher completion of their prompts is dropped as wrong", no_answer=missing)
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
                      f"({counts['truncated']} truncated, {counts['empty']} empty, {counts['wrong']} wrong) at "
                      f"{counts['tokens_per_s'] or 0:,.0f} tokens/s"
                      + (f"; {counts['kept_of_extra']} of the kept are for the {len(extra)} prompts of "
                         f"distill.sequence_kd.prompts" if extra else ""), **counts)
        return counts
    run_stage(run, Stage("teacher_samples", inputs, [TEACHER_COMPLETIONS], make))
    rows = read_jsonl(run.path(TEACHER_COMPLETIONS))
    if not rows:
        from ..errors import UserError
        raise UserError(f"{run.path(TEACHER_COMPLETIONS)}: the teacher wrote no completion that was kept (none "
                        f"ended with text within max_new_tokens, or none was verified correct); nothing to train on")
    if own is not data:  # (a student of another tokenizer: the teacher's text, in the student's tokens)
        pairs, data = in_student_tokens(run, rows, own), own
    else:
        pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
        pairs = _within(run, pairs, len(rows), "")
    x, y = (torch.from_numpy(a) for a in as_arrays(pairs, data.pad_id))
    if not seq["replace"]:
        width = max(x.shape[1], data.x_train.shape[1])
        pad = lambda a, v: torch.nn.functional.pad(a, (0, width - a.shape[1]), value=v)  # noqa: E731
        x, y = torch.cat([pad(data.x_train, data.pad_id), pad(x, data.pad_id)]), torch.cat([pad(data.y_train, -100),
                                                                                          pad(y, -100)])
    return with_training_split(data, x, y), len(pairs)


def _within(run: RunDir, pairs: list, kept: int, how: str) -> list:
    """The (prompt, completion) pairs whose training row fits in data.max_length (the teacher may write past
    it: max_new_tokens counts from the prompt); those left out are counted."""
    limit = run.cfg["data"]["max_length"]
    fit = [(p, c) for p, c in pairs if len(p) + len(c) - 1 <= limit]
    run.event(f"teacher_samples: {len(fit)} of the {kept} kept completions{how} fit in data.max_length "
              f"({limit}); {len(pairs) - len(fit)} longer left out", fit=len(fit), too_long=len(pairs) - len(fit))
    if not fit:
        from ..errors import UserError
        raise UserError(f"data.max_length: {limit} tokens holds none of the teacher's completions{how}; raise it")
    return fit


def in_student_tokens(run: RunDir, rows: list, data: DataBundle) -> list:
    """The teacher's kept completions as (prompt ids, completion ids) in a student's own tokenizer: each
    prompt as the student's data has it (the same row of the same split: the split does not depend on the
    tokenizer), the completion's text re-encoded, with the student's EOS. Rows that no longer fit in
    data.max_length are left out, and counted."""
    from ..data.completions import completion_ids, teacher_prompts
    from ..models.hf import load_tokenizer
    from ..tasks.causal_lm import prompts_and_answers
    tok = load_tokenizer(data.tokenizer, "student.hf")
    prompts = prompts_and_answers(data.x_train, data.y_train)[0] + teacher_prompts(run.cfg, data, tok)[0]
    return _within(run, [(prompts[r["row"]], completion_ids(r["completion"], tok)) for r in rows], len(rows),
                   f" re-encoded in the student's tokenizer ({data.tokenizer})")


def added_files_input(run: RunDir) -> Dict[str, Any]:
    """The hashes of the files of inputs a distilled model adds to the data: the `distill.sequence_kd.prompts`
    file (for the teacher's samples, and the distilled student and assistants trained on them) and the
    `distill.data.unlabeled` texts (the student and assistants); not for the scratch student. An edited file
    is a new input."""
    from ..data.completions import teacher_prompts_file
    path = teacher_prompts_file(run.cfg) if run.cfg["distill"]["sequence_kd"]["samples"] else None
    unlabeled = run.cfg["distill"]["data"]["unlabeled"]
    return {**({"teacher_prompts": sha256_file(path)} if path else {}),
            **({"unlabeled": sha256_file(unlabeled)} if unlabeled else {})}


def read_jsonl(path: str) -> list:
    import json
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
