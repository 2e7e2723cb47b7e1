"""`distill compress RUN_DIR`: the compression steps of the recipe's `compress` section, in order, on the
distilled student of a finished run.

    vocab     keep the embedding rows of tokens the data uses (exact on them; no fine-tune); a causal LM's
              output rows too, with its tokenizer rewritten (its last step: later fine-tunes need them all)
    layers    drop the least important layer (measured), distil from the model before the drop; repeat
    heads     prune attention heads by importance, then distil from the teacher
    channels  prune CNN filters or transformer feed-forward neurons by L1 norm, then distil from the teacher
    qat       distil from the teacher with int8-simulated Linear layers (deploy with dynamic int8)

Each step saves its model as `compress/<name>` (a Hugging Face folder, or a .safetensors file that records
the dropped blocks) and a line in `compress/compress.json`. A step whose inputs are unchanged is reused.
"""
from __future__ import annotations

import copy
import os
import time
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .. import __version__
from ..data.completions import sequence_tokens
from ..errors import UserError
from ..evaluate import weights_size
from ..io import load_meta, model_sha256, sha256_json, weights_sha256, write_json
from ..models import count_params
from ..models.hf import load_tokenizer
from ..pipeline.artifacts import (distill_settings, kind, load_saved, model_spec, require_same_data, require_saved,
                                  save_role)
from ..pipeline.rundir import RunDir, stage_fingerprints
from ..pipeline.stage import Stage, run_stage
from ..pipeline.teacher_outputs import student_data
from ..pipeline.training import distil, waitless
from ..recipe import LM_DATASETS, is_text
from ..recipe_checks import MODEL_SOURCES
from ..roles import STUDENT, TEACHER, compressed, recipe_section
from ..tasks import task_for
from . import layers as layer_drop
from .prune import attention_parts, ffn_kinds, filter_pairs, head_importance, prune_channels, prune_ffn, prune_heads
from .quantize import dynamic_int8, finish_qat, prepare_qat
from .structure import heads_per_layer
from .vocab import check_trimmable, trim_lm_vocabulary, trim_vocabulary


class Compressor:
    """The state of one `distill compress` run: the current model, the teacher, and what each step did."""

    def __init__(self, run: RunDir, teacher: nn.Module, model: nn.Module) -> None:
        self.run, self.c = run, run.cfg["compress"]
        self.teacher, self.model = teacher, model
        augment = run.own_augment(STUDENT)  # (the fine-tunes train as the student does)
        self.fingerprint = sha256_json({"source": weights_sha256(self.model), "teacher": model_sha256(self.teacher),
                                        "version": __version__, "data": run.data.fingerprint,
                                        "finetune_data": "the student's",  # (fine-tunes read the unlabelled too)
                                        # (how the fine-tunes train: the student's settings, compress.lr)
                                        "finetune": {"lr": self.c["lr"], "train": waitless(run.train_cfg(STUDENT)),
                                                     "distill": run.cfg["distill"]},  # (as set: nothing built)
                                        **({"augment": augment} if augment else {})})
        self.records: List[Dict[str, Any]] = []
        self.role = recipe_section(self.c["source"])  # the kind of model compressed (how it is saved)
        self.kind = kind(run.cfg, self.role)
        self.text = is_text(run.cfg, self.role)
        self.drops: List[str] = []  # CNN blocks removed so far, in order (saved so the model can be rebuilt)
        m = run.cfg[self.role]
        built = next((k for k in (*MODEL_SOURCES, "checkpoint") if m.get(k)), "model")
        self.what = f"the {self.c['source']} ({repr(m['model']) if m['model'] else built})"

    # ------------------------------------------------------------ helpers
    def finetune(self, name: str, teacher: nn.Module, epochs: int, prepare: Optional[Callable] = None,
                 lr_scale: float = 1.0) -> Dict:
        """Distil into the current model from `teacher` (logits at the recipe's T and alpha; layer losses
        are left out, as layers no longer match) for `epochs`, keeping the best validation epoch."""
        run = self.run
        tcfg = copy.deepcopy(run.train_cfg(STUDENT))
        tcfg["epochs"] = epochs
        tcfg["optimizer"]["lr"] = (self.c["lr"] or tcfg["optimizer"]["lr"]) * lr_scale
        dcfg = {**distill_settings(run), "features": []}
        model = prepare(self.model) if prepare else self.model
        info = distil(run, compressed(name), model, teacher, "online", data=self.data, dcfg=dcfg, tcfg=tcfg)
        model.cpu(), teacher.cpu()  # pruning and measuring run on the CPU; only fine-tunes use train.device
        info.pop("train_time_s")  # (the step's own time_s covers it)
        info.pop("val_history", None)  # (each epoch's accuracy: for a search's pruner, not the step's record)
        return info

    @cached_property
    def data(self):
        """What every fine-tune distils on: what the student learnt from (the unlabelled inputs, augmented and
        teacher-written text too), made with the run's teacher once, whichever model a step distils from."""
        return student_data(self.run, self.teacher, "compress")[0]

    def step(self, name: str, params: Dict[str, Any], work: Callable[[], Dict[str, Any]]) -> None:
        """Run `work` (which replaces self.model) unless a saved result with the same inputs exists: a stage
        like every other, fine-tunes logged, monitored and checkpointed by the same trainer."""
        run = self.run
        inputs = {"before": self.fingerprint, "step": name, "params": params}
        self.fingerprint = sha256_json(inputs)
        out = self.kind.artifact(compressed(name))

        def make() -> Dict[str, Any]:
            t0 = time.perf_counter()
            info = work()
            info["time_s"] = round(time.perf_counter() - t0, 3)
            self.write_record()  # (the chain so far, before the step's file is replaced: a compress killed from
            self.save(name, info)  # here on names no step of an older chain, made from other models)
            return info
        record = run_stage(run, Stage(compressed(name), inputs, [out], make))
        info = {k: v for k, v in record.items() if k not in ("fingerprint", "reused", "recipe")}
        if record["reused"]:
            self.model = load_saved(run, compressed(name))
            if not self.text:
                self.drops = list(load_meta(run.path(out))["structure"]["drop"])
        def validate(model: nn.Module) -> Dict[str, float]:
            return task_for(run.data).validate(model, run.data, run.cfg["data"]["eval_batch_size"])
        scores = validate(self.model)
        if name == "qat":  # (its float weights are kept; deployed as dynamic int8, measured so too)
            scores["int8_val_accuracy"] = validate(dynamic_int8(self.model))["val_accuracy"]
        val = scores["val_accuracy"]
        path = require_saved(run.out, compressed(name))
        record = {"name": name, "path": os.path.relpath(path, run.out),  # (the folder may move: bench resolves it)
                  "params": count_params(self.model), **scores, **info, "size_bytes": weights_size(path)}
        if self.text:
            record["heads_per_layer"] = heads_per_layer(self.model.hf)
        self.records.append(record)
        self.write_record()
        int8 = f" ({scores['int8_val_accuracy']:.4f} as dynamic int8)" if "int8_val_accuracy" in scores else ""
        run.event(f"compress: {name}: {record['params']:,} parameters, validation accuracy {val:.4f}{int8}"
                  + (f", loss {scores['val_loss']:.4f}" if "val_loss" in scores else ""),
                  **{k: v for k, v in record.items() if k in ("name", "params", "val_accuracy", "val_loss")})

    def write_record(self, finished: bool = False) -> None:
        """compress.json, the chain so far: written after each step, so that a stopped compress leaves the
        steps it made since, not an earlier chain's later steps (made from other models) beside them; `finished`
        once every step has run (the report says of a chain without it that it stopped midway)."""
        if not self.run.runtime.is_main:  # (under torchrun every process runs the chain; one writes it)
            return
        versions = stage_fingerprints(self.run.out)  # (which versions the chain was made from: report, bench)
        made_from = {k: versions.get(k) for k in dict.fromkeys((TEACHER, self.c["source"]))}
        write_json(self.run.path(os.path.join("compress", "compress.json")),
                   {"source": self.c["source"], "steps": self.c["steps"], "made_from": made_from,
                    "models": self.records, "finished": finished})

    def save(self, name: str, info: Dict[str, Any]) -> None:
        save_role(self.run, self.model, self.role, compressed(name), model_spec(self.run, self.role),
                  {**info, "structure": {"drop": self.drops}})

    # ------------------------------------------------------------ steps
    def vocab(self) -> None:
        data, path = self.run.data, self.run.cfg["data"]["tokenizer"]
        tok = load_tokenizer(path, "data.tokenizer")

        def work() -> Dict[str, Any]:
            # (every input the student learnt from and the fine-tunes read: the unlabelled, augmented and
            # teacher-written ones too; a token seen only there would be read as [UNK])
            texts = [data.x_train, data.x_val, self.data.x_train]
            if data.task == "causal_lm":  # (the completions too: the model must still write them)
                texts += [data.y_train, data.y_val, self.data.y_train]
            before = self.model.hf.get_input_embeddings().num_embeddings
            if data.task != "causal_lm":
                self.model = trim_vocabulary(self.model, texts, tok.unk_token_id)
                return {"vocab_before": before, "vocab_after": self.model.hf.get_input_embeddings().num_embeddings}
            self.model = trim_lm_vocabulary(self.model, texts, tok, path)
            test = sequence_tokens(data.x_test, data.y_test)
            kept = torch.zeros(self.model.vocab_size, dtype=torch.bool)
            kept[self.model.vocab_ids] = True
            outside = int((~kept[test]).sum())  # (read as padding, scored as impossible: say so)
            self.run.event(f"compress: vocab: {len(self.model.vocab_ids):,} of {before:,} tokens kept; {outside} of "
                           f"{len(test):,} test tokens are outside them")
            return {"vocab_before": before, "vocab_after": len(self.model.vocab_ids), "test_tokens_outside": outside}
        self.step("vocab", {"kept": "tokens of the student's training inputs"}, work)  # (not the labelled alone)

    def check(self, steps: List[str]) -> None:
        """Every step applies to the model, checked before the first one fine-tunes: a later step's mistake
        was found after the earlier steps had replaced the chain's models. (The steps change the sizes of what
        the others look for, not its kind: pruning keeps the layers, dropping layers keeps each one's parts.)"""
        if "layers" in steps and not layer_drop.droppable(self.model):
            raise UserError(f"compress.layers: {self.what} has no layer or block that can be dropped "
                            f"(transformer encoders with 2+ layers, or residual blocks with an identity shortcut)")
        if "heads" in steps:
            attention_parts(self.model)
        if "channels" in steps and self.text:
            ffn_kinds(self.model)
        elif "channels" in steps:
            filter_pairs(self.model, self.what)

    def layers(self) -> None:
        lc, data, bs = self.c["layers"], self.run.data, self.run.cfg["data"]["eval_batch_size"]
        if layer_drop.depth(self.model) <= lc["to"]:
            self.run.event(f"compress: layers: the model has {layer_drop.depth(self.model)} droppable units, not more "
                           f"than compress.layers.to={lc['to']}; nothing to drop")
        while layer_drop.depth(self.model) > lc["to"]:
            target = max(lc["to"], layer_drop.depth(self.model) - lc["step"])
            name = f"layers{target}"

            def work() -> Dict[str, Any]:
                previous, dropped = self.model, []
                while layer_drop.depth(self.model) > target:
                    unit, losses = layer_drop.least_important(self.model, data.x_val, data.y_val, bs)
                    self.run.event("compress: validation loss without each unit: "
                                   + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f"; dropping {unit}")
                    self.model = layer_drop.without(self.model, unit)
                    dropped.append({"unit": unit, "val_loss_without": losses})
                    if not self.text:
                        self.drops.append(unit)
                teacher = previous if lc["teacher"] == "previous" else self.teacher
                return {"dropped": dropped, "finetune": self.finetune(name, teacher, lc["epochs"])}
            self.step(name, {**lc, "target": target}, work)

    def heads(self) -> None:
        hc, data = self.c["heads"], self.run.data

        def work() -> Dict[str, Any]:
            pick = data.training_sample(hc["samples"])
            scores = head_importance(self.model, hc["importance"], data.x_train[pick], data.y_train[pick])
            before = heads_per_layer(self.model.hf)
            self.model = prune_heads(self.model, hc["keep"], scores)
            return {"heads_before": before, "importance": [s.tolist() for s in scores],
                    "finetune": self.finetune("heads", self.teacher, hc["epochs"])}
        self.step("heads", hc, work)

    def channels(self) -> None:
        cc = self.c["channels"]

        def work() -> Dict[str, Any]:
            before = self._widths()
            self.model = prune_ffn(self.model, cc["keep"]) if self.text else \
                prune_channels(self.model, cc["keep"], self.what)
            return {"widths_before": before, "widths_after": self._widths(),  # (what was removed, and why:)
                    "ranked_by": "L1 norm of each neuron's (filter's) weights, the largest kept",
                    "finetune": self.finetune("channels", self.teacher, cc["epochs"])}
        self.step("channels", cc, work)

    def _widths(self) -> Dict[str, int]:
        """The width channels pruning sets, by module: each conv's filters, or each layer's feed-forward
        neurons."""
        if not self.text:
            return {n: m.out_channels for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)}
        return {n: m.out_features for n, m in self.model.named_modules()
                if n.endswith(("intermediate.dense", "mlp.up_proj")) and isinstance(m, nn.Linear)}

    def qat(self) -> None:
        def work() -> Dict[str, Any]:
            qc = self.c["qat"]  # (a small learning rate: the model is trained already, only the rounding is new)
            info = self.finetune("qat", self.teacher, qc["epochs"], prepare=prepare_qat, lr_scale=qc["lr_scale"])
            finish_qat(self.model)
            return {"finetune": info, "deploy": "dynamic int8 (Linear layers)"}
        self.step("qat", self.c["qat"], work)



def compress(run: RunDir, teacher: Optional[nn.Module] = None, model: Optional[nn.Module] = None
             ) -> List[Dict[str, Any]]:
    """Every step of `compress.steps` on `model` (the recipe's compress.source), distilling from `teacher`;
    returns (and writes to compress/compress.json) one record per model."""
    steps = run.cfg["compress"]["steps"]
    if not run.cfg["data"]["val_fraction"]:
        raise UserError("data.val_fraction: 0 leaves no validation split, and compress measures each step on it; "
                        "distil with data.val_fraction > 0 to compress")
    if not steps:
        lm = run.cfg["data"]["dataset"] in LM_DATASETS
        raise UserError(f"compress.steps: empty; name the steps to run, e.g. --set 'compress.steps="
                        f"{'[layers, channels, vocab]' if lm else '[layers, heads, qat]'}' (choose from "
                        f"{'layers, channels, vocab' if lm else 'vocab, layers, heads, channels, qat'})")
    if run.student_tokenizer and run.cfg["compress"]["source"] != TEACHER:
        raise UserError(f"compress.source: {run.cfg['compress']['source']} reads another tokenizer than the teacher "
                        f"(student.hf); compress works in the teacher's tokens (its fine-tunes distil the teacher's "
                        f"logits), which needs one vocabulary")
    for name in (TEACHER, run.cfg["compress"]["source"]):  # (the fine-tunes and the scores read the data now)
        require_same_data(run.out, name, run.data_for(name))
    teacher = teacher or load_saved(run, TEACHER)
    model = model or load_saved(run, run.cfg["compress"]["source"])
    c = Compressor(run, teacher, copy.deepcopy(model) if model is teacher else model)  # (QAT prepares it in place)
    if "vocab" in steps:
        path = run.cfg["data"]["tokenizer"]
        check_trimmable(c.model, load_tokenizer(path, "data.tokenizer"), path)
    c.check(steps)
    for name in steps:
        getattr(c, name)()
    c.write_record(finished=True)  # (also when no step made a model: an earlier chain's records would stay)
    return c.records
