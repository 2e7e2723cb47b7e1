"""What a stage leaves in the run folder, by kind of model, and how it comes back.

Two kinds of model, each behind the same five questions (its spec, how to build it, where it is saved, how
to save it, which extra layer losses the recipe's `distill.layers` adds for it):

    registry     a registry model or a layer list: one `<name>.safetensors` file, the spec in its header
    huggingface  a Hugging Face transformer: a `<name>/` folder that plain `transformers` loads

Every saved model carries what a raw input goes through before it (`preprocessing`: the training split's
normalisation) and the class names, so an exported model can take raw inputs. A weights file depends only on
the weights and that description: timings live in stages.json and metrics.json.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shlex
from typing import Any, Dict, List, Optional

import numpy as np
from torch import nn

from ..data import DataBundle
from ..engine.trainer import set_seed
from ..errors import UserError
from ..io import files_sha256, load_meta, load_weights, read_run_json, save_model
from ..losses import transformer_features
from ..models import build_model
from ..models.hf_lm import check_same_tokenizer, fresh_lm, load_causal_lm, same_tokenizer
from ..models.hf import fresh_student, is_model_folder, load_classifier, load_folder, load_tokenizer, \
    resolve_hf_path, save_folder, select_layers, tokenization_hash
from ..recipe import COMPLETIONS, is_text, seeds_hint
from ..recipe_checks import text_only_kd
from ..roles import SCRATCH, STUDENT, TEACHER, stage_command
from .rundir import UNFINISHED, RunDir, data_cfg_for, metrics_out_of_date

TIMINGS = ("train_time_s", "time_s", "monitor_s")  # in stages.json and metrics.json, never in a weights file


def preprocessing(data: DataBundle) -> Dict[str, Any]:
    """What a raw input goes through before the model sees it: per-feature (vectors) or per-channel (images)
    normalisation with the training split's statistics."""
    if not data.stats:
        return {}
    return {"normalize": {"mean": data.stats["mean"], "std": data.stats["std"], "axis": 1, "image": bool(data.image)}}


def check_preprocessing(meta: Dict[str, Any], data: DataBundle, where: str) -> None:
    """A checkpoint that distill saved learnt on inputs normalised (or not) with its training data's
    statistics; fed this data's, it would silently score other inputs. Normalised against raw is refused, and
    so are statistics far from this data's: the median feature's (channel's) mean more than half a standard
    deviation away, or its standard deviation more than twice or half this data's (the median, so that a
    pixel constant in one split and not in another is not a mismatch)."""
    if "preprocessing" not in meta:  # (not written by distill: nothing to compare)
        return
    theirs, ours = (meta["preprocessing"] or {}).get("normalize"), preprocessing(data).get("normalize")
    if bool(theirs) != bool(ours):
        said = lambda v: "true" if v else "false"  # noqa: E731
        raise UserError(f"{where}: it was trained on {'normalised' if theirs else 'raw'} inputs, and "
                        f"data.transforms.normalize is {said(ours)} here; set it to {said(theirs)}")
    if theirs and ours and len(theirs["mean"]) == len(ours["mean"]):
        m1, s1, m2, s2 = (np.asarray(v, dtype=np.float64) for v in (theirs["mean"], theirs["std"], ours["mean"],
                                                                    ours["std"]))
        vary = (s1 != 1.0) & (s2 != 1.0)  # (a feature constant in either is given std 1 there: not compared)
        if not vary.any():
            return
        m1, s1, m2, s2 = m1[vary], s1[vary], m2[vary], s2[vary]
        shift, ratio = float(np.median(np.abs(m1 - m2) / s2)), float(np.median(np.maximum(s1 / s2, s2 / s1)))
        if shift > 0.5 or ratio > 2:
            raise UserError(f"{where}: it was trained on inputs of another scale (the median feature's mean "
                            f"{shift:.3g} standard deviations away from this data's, its standard deviation "
                            f"{ratio:.3g}x); is it the same dataset and preprocessing?")


def check_split(meta: Dict[str, Any], data: DataBundle, where: str) -> None:
    """A checkpoint trained on another split of this same data has trained on rows of this test split, maybe
    most of them: its test score, and its students', would be inflated (a loaded teacher scored 0.989 where it
    scored 0.975 on its own test split). Refused; files that predate the record pass."""
    theirs, ours = meta.get("rows") if isinstance(meta.get("rows"), dict) else {}, data.rows
    if theirs.get("all") and theirs.get("all") == ours.get("all") and theirs.get("test") != ours.get("test"):
        raise UserError(f"{where}: trained on another split of this data (data.split_seed or test_fraction "
                        f"differ), so rows of this test split may be rows it trained on and the scores would be "
                        f"inflated; split the data as it was split then, or train it here")


def model_meta(data: DataBundle, name: str, spec: Dict[str, Any], info: Dict[str, Any]) -> Dict[str, Any]:
    """The header a saved model carries: its architecture, its data's shape and classes, its preprocessing,
    and what its stage recorded (timings, and each epoch's validation accuracy, left out: the file's size is
    the deployable model's)."""
    return {"spec": spec, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "class_names": data.class_names, "role": name, "preprocessing": preprocessing(data),
            **({"rows": data.rows} if data.rows else {}),
            **_untimed(info)}


def _untimed(info: Any) -> Any:
    """`info` less its timings and validation history, at every depth (a compress step's fine-tune holds its
    own): the same weights make the same file."""
    if isinstance(info, dict):
        return {k: _untimed(v) for k, v in info.items() if k not in (*TIMINGS, "val_history")}
    return [_untimed(v) for v in info] if isinstance(info, list) else info


def teacher_layers(from_teacher: Dict[str, Any], n: int) -> List[int]:
    """The teacher layers a layer-selected student keeps: the list given, or every k-th from the first."""
    return list(from_teacher["layers"]) if from_teacher["layers"] is not None else list(
        range(0, n, from_teacher["keep_every"]))


def _plain(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A registry spec as compared: as a file stores it (JSON: tuples are lists), layer lists without spaces."""
    arch = spec.get("arch")
    return json.loads(json.dumps({"model": spec.get("model"), "args": spec.get("args") or {},
                                  "arch": [str(a).replace(" ", "") for a in arch] if arch else arch}))


class RegistryModels:
    """Registry models and layer lists, saved as one .safetensors file that names its architecture."""

    def spec(self, run: RunDir, role: str) -> Dict[str, Any]:
        m = run.cfg[role]
        if m["model"] or m["arch"]:
            return {"model": m["model"], "args": m["args"], "arch": m["arch"]}
        spec = load_meta(m["checkpoint"]).get("spec")
        if not spec:
            raise UserError(f"{role}.checkpoint: {m['checkpoint']} does not say its architecture; add {role}.model")
        return spec

    def build(self, run: RunDir, role: str) -> nn.Module:
        m, data = run.cfg[role], run.data
        spec = self.spec(run, role)
        model = build_model(spec, data.input_shape, data.num_classes, where=role)
        if m["checkpoint"]:
            meta = load_meta(m["checkpoint"])
            if meta.get("spec") and _plain(meta["spec"]) != _plain(spec):  # (the same weights' shapes can take
                raise UserError(f"{role}.checkpoint: {m['checkpoint']} holds a model of another architecture "  # Tanh
                                f"({_plain(meta['spec'])}) than {role} gives ({_plain(spec)}); leave {role}.model, "
                                f"args and arch out to load it as it was saved")  # for ReLU: silently another model)
            if meta.get("num_classes") not in (None, data.num_classes):
                raise UserError(f"{role}.checkpoint: {m['checkpoint']} was trained for {meta['num_classes']} "
                                f"classes but the data has {data.num_classes}")
            names = meta.get("class_names")
            if names and names != data.class_names:
                raise UserError(f"{role}.checkpoint: {m['checkpoint']} was trained on classes {names} but the "
                                f"data has {data.class_names}; teacher and student must share one class list")
            if meta.get("input_shape") not in (None, list(data.input_shape)):
                raise UserError(f"{role}.checkpoint: {m['checkpoint']} was trained on inputs shaped "
                                f"{tuple(meta['input_shape'])} but the data's are {tuple(data.input_shape)}")
            check_preprocessing(meta, data, f"{role}.checkpoint: {m['checkpoint']}")
            check_split(meta, data, f"{role}.checkpoint: {m['checkpoint']}")
            load_weights(model, m["checkpoint"], f"{role}.checkpoint")
        return model

    def artifact(self, name: str) -> str:
        return f"{name}.safetensors"

    def save(self, run: RunDir, model: nn.Module, name: str, spec: Dict[str, Any], info: Dict[str, Any]) -> None:
        save_model(model, run.path(self.artifact(name)), model_meta(run.data, name, spec, info))

    def layer_features(self, cfg: Dict[str, Any], teacher: nn.Module, student: nn.Module) -> List[Dict[str, Any]]:
        return []


def important_layers(run: RunDir, teacher: nn.Module, keep: int) -> List[int]:
    """The `keep` teacher layers that matter most on the validation split (Minitron depth pruning): each
    layer's importance is the rise in loss when it alone is skipped, on the data's probe of 8 sequences (the
    first validation ones; without a validation split, a fixed sample of the training ones).
    Measured once per teacher (the scores are logged)."""
    from ..io import weights_sha256
    from ..models.hf_lm import layer_importance, most_important
    from ..tasks.causal_lm import trimmed
    if keep > teacher.num_layers:
        raise UserError(f"student.from_teacher.importance: {keep} layers, and the teacher has {teacher.num_layers}")
    memo = run.__dict__.setdefault("layer_importance", {})
    key = weights_sha256(teacher)
    if key not in memo:
        x, y = run.data.probe(8)
        x, y = trimmed(x, y)
        rises = layer_importance(teacher, x.to(next(teacher.parameters()).device), y.to(next(teacher.parameters()).device))
        memo[key] = rises
        kept = most_important(rises, keep)
        run.event("layer importance (loss rise when skipped): " + ", ".join(f"{i}:{r:+.3f}" for i, r in enumerate(rises))
                  + f"; keeping {kept}", importance=rises, kept=kept)
    return most_important(memo[key], keep)


def fits_context(model: nn.Module, longest: int, where: str, role: str, cut: str) -> nn.Module:
    """`model`, refused when it has a table of learnt positions shorter than the data's longest row."""
    context = getattr(model, "context", None)
    if context is not None and longest > context:
        raise UserError(f"{where}: sequences of up to {longest} tokens, and the {role} reads at most {context} "
                        f"positions (its table of learnt positions); give data.max_length <= {context} {cut}, or "
                        f"a model of a longer context")
    return model


class HuggingFaceModels:
    """Transformers loaded from a folder or derived from the teacher (layer selection, or a smaller fresh
    config), saved as Hugging Face folders. Students must read the teacher's tokens: one vocabulary."""

    def spec(self, run: RunDir, role: str) -> Dict[str, Any]:
        """The recipe's keys, and the content of the folders or files they name: a folder whose model was
        replaced under the same path is a new input (it was reused by its path)."""
        m = run.cfg[role]
        spec = {k: m[k] for k in ("hf", "finetuned", "from_teacher", "hf_config")}
        if m["hf"]:
            spec["hf_files"] = files_sha256(resolve_hf_path(m["hf"], f"{role}.hf"))
        if role == TEACHER:
            return spec
        t = run.cfg[TEACHER]["hf"]
        return {**spec, "teacher_hf": t,
                **({"teacher_hf_files": files_sha256(resolve_hf_path(t, "teacher.hf"))} if t else {})}

    def build(self, run: RunDir, role: str) -> nn.Module:
        if run.data.task == "causal_lm":
            return self._build_lm(run, role)
        data = run.data_for(role)  # (texts are padded to data.max_length: their real lengths count)
        longest = max(int((x != data.pad_id).sum(1).max()) for x in (data.x_train, data.x_val, data.x_test) if len(x))
        return fits_context(self._classifier(run, role), longest, run.cfg["data"]["path"], role,
                            "to cut texts there")

    def _classifier(self, run: RunDir, role: str) -> nn.Module:
        m, t, names = run.cfg[role], run.cfg[TEACHER], run.data.class_names
        if m["hf"]:
            path = resolve_hf_path(m["hf"], f"{role}.hf")
            model = load_classifier(path, names, f"{role}.hf", finetuned=m["finetuned"])
            check_split(read_run_json(os.path.join(path, "distill.json"), {}),  # (a folder distill fine-tuned:
                        run.data_for(role), f"{role}.hf: {m['hf']}")  # which rows it trained on)
            # (one vocabulary is not enough: a tokenizer that does not lowercase reads cased text as [UNK]s; a
            # classifier renders no chat)
            same = lambda: tokenization_hash(load_tokenizer(path, f"{role}.hf"), chat=False) == (  # noqa: E731
                tokenization_hash(load_tokenizer(run.cfg["data"]["tokenizer"], "data.tokenizer"), chat=False))
            if role == TEACHER:
                teacher_reads_the_data_tokens(path, run.cfg["data"]["tokenizer"], same)
            elif not same():
                raise UserError(f"{role}.hf: {m['hf']} has another tokenizer than the data's "
                                f"({run.cfg['data']['tokenizer']}: its vocabulary, or how it splits text); teacher "
                                f"and student must read the same token ids")
            return model
        ft = m["from_teacher"]
        if ft and ft["source"] == "finetuned" and os.path.isdir(run.path(TEACHER)):
            base = load_saved(run, TEACHER)  # (before the teacher is trained, preflight uses the pretrained one)
        else:
            base = load_classifier(resolve_hf_path(t["hf"], "teacher.hf"), names, "teacher.hf",
                                   finetuned=t["finetuned"])
        if ft:
            return select_layers(base, teacher_layers(ft, base.num_layers), f"{role}.from_teacher")
        c = m["hf_config"]
        return fresh_student(base, c["layers"], c["hidden"], c["heads"], c["intermediate"], f"{role}.hf_config")

    def _build_lm(self, run: RunDir, role: str) -> nn.Module:
        model = self._lm(run, role)
        data = run.data_for(role)
        where = run.cfg['data']['path'] or 'data.dataset: ' + run.cfg['data']['dataset']
        splits = [x for x in (data.x_train, data.x_val, data.x_test) if x.numel()]
        # (a token the tokenizer added past its base vocabulary, say for a chat template, may have no row)
        top = max(int(t.max()) for t in (*splits, data.y_train, data.y_val, data.y_test) if t.numel())
        if top >= model.vocab_size:
            raise UserError(f"{where}: token id {top} in the tokenised data, and the {role} embeds "
                            f"{model.vocab_size:,} tokens (0 to {model.vocab_size - 1:,}): a token its tokenizer "
                            f"added (special or chat-template tokens) without a row of the model's embedding")
        longest = max(x.shape[1] for x in splits)  # (not data.max_length: rows are padded to the longest only)
        return fits_context(model, longest, where, role, "to refuse longer rows")

    def _lm(self, run: RunDir, role: str) -> nn.Module:
        """A causal LM: loaded (teacher, or a student folder of the same tokenizer), or derived from the
        teacher (its layers kept by list or every k-th, or a smaller fresh config)."""
        m, t = run.cfg[role], run.cfg[TEACHER]
        if m["hf"]:
            model = untrimmed(load_causal_lm(m["hf"], f"{role}.hf"), f"{role}.hf", m["hf"])
            tok = run.cfg["data"]["tokenizer"]
            if role == TEACHER:
                teacher_reads_the_data_tokens(m["hf"], tok, lambda: same_tokenizer(m["hf"], tok, "teacher.hf"))
            if role != TEACHER and run.student_tokenizer and not text_only_kd(run.cfg):
                check_same_tokenizer(m["hf"], tok, f"{role}.hf")  # (refuses, naming why)
            return model
        ft = m["from_teacher"]
        if ft and ft["source"] == "finetuned" and os.path.isdir(run.path(TEACHER)):
            base = load_saved(run, TEACHER)
        else:
            base = untrimmed(load_causal_lm(t["hf"], "teacher.hf"), "teacher.hf", t["hf"])
        if ft and ft["importance"]:
            return select_layers(base, important_layers(run, base, ft["importance"]), f"{role}.from_teacher")
        if ft:
            return select_layers(base, teacher_layers(ft, base.num_layers), f"{role}.from_teacher")
        c = m["hf_config"]
        return fresh_lm(base, c["layers"], c["hidden"], c["heads"], c["intermediate"], f"{role}.hf_config")

    def artifact(self, name: str) -> str:
        return name

    def save(self, run: RunDir, model: nn.Module, name: str, spec: Dict[str, Any], info: Dict[str, Any]) -> None:
        # (with its own tokenizer: a student of another tokenizer than the teacher's)
        tokenizer = data_cfg_for(run.cfg, name, run.student_tokenizer)["tokenizer"]
        save_folder(model, run.path(name), tokenizer, model_meta(run.data_for(name), name, spec, info))

    def layer_features(self, cfg: Dict[str, Any], teacher: nn.Module, student: nn.Module) -> List[Dict[str, Any]]:
        """`distill.layers` (hidden states, attention maps, embeddings, [CLS]) as `distill.features` entries."""
        if cfg["data"]["dataset"] in COMPLETIONS:
            return []  # (refused for causal LMs by the recipe check)
        ft = cfg["student"]["from_teacher"]
        return transformer_features(cfg["distill"]["layers"], teacher.num_layers, student.num_layers,
                                    teacher.width == student.width,
                                    teacher_layers(ft, teacher.num_layers) if ft else None)


def teacher_reads_the_data_tokens(teacher: str, tokenizer: str, same) -> None:
    """data.tokenizer (by default the teacher's own) must give the teacher's ids: `same()` compares them."""
    if os.path.abspath(teacher) != os.path.abspath(tokenizer) and not same():
        raise UserError(f"data.tokenizer: {tokenizer} is not the teacher's tokenizer ({teacher}), and the teacher "
                        f"reads the data's token ids; leave data.tokenizer out (it defaults to the teacher's)")


def untrimmed(model: nn.Module, where: str, path: str) -> nn.Module:
    """A causal LM to train from: not a `compress.vocab` folder, whose ids are its own trimmed vocabulary's."""
    if getattr(model, "vocab_ids", None) is not None:
        raise UserError(f"{where}: {path} is a deployment folder with a trimmed vocabulary (distill compress, step "
                        f"vocab); train and distil from the model it was trimmed from")
    return model


KINDS = {"registry": RegistryModels(), "huggingface": HuggingFaceModels()}


def kind(cfg: Dict[str, Any], role: str):
    """The kind of model the recipe gives for `role` (teacher, or student: the student's kind for students)."""
    return KINDS["huggingface" if is_text(cfg, role) else "registry"]


def model_spec(run: RunDir, role: str) -> Dict[str, Any]:
    """The architecture of `role`: from the recipe, or from the checkpoint's own metadata."""
    return kind(run.cfg, role).spec(run, role)


def build_role(run: RunDir, role: str) -> nn.Module:
    """Build the teacher or student for this data (from its checkpoint when the recipe gives one), from the
    role's seed: the scratch and distilled students start equal."""
    set_seed(run.cfg[role]["train"]["seed"])
    return kind(run.cfg, role).build(run, role)


def artifact(cfg: Dict[str, Any], role: str, name: str) -> str:
    """The file (or folder) a stage `name` of a `role`-kind model leaves in the run folder."""
    return kind(cfg, role).artifact(name)


def save_role(run: RunDir, model: nn.Module, role: str, name: str, spec: Dict[str, Any],
              info: Dict[str, Any]) -> None:
    if run.runtime.is_main:  # (only the main process writes)
        kind(run.cfg, role).save(run, model, name, spec, info)


def resolve_distill(cfg: Dict[str, Any], teacher: nn.Module, student: nn.Module) -> Dict[str, Any]:
    """The `distill` section with `distill.layers` expanded into feature entries for these two models."""
    dcfg = copy.deepcopy(cfg["distill"])
    if is_text(cfg, "teacher") and is_text(cfg, "student"):
        dcfg["features"] += kind(cfg, "student").layer_features(cfg, teacher, student)
    return dcfg


def distill_settings(run: RunDir, teacher: Optional[nn.Module] = None, student: Optional[nn.Module] = None
                     ) -> Dict[str, Any]:
    """The resolved `distill` section of the run (built once: layer losses depend on both models)."""
    if getattr(run, "dcfg", None) is None:
        run.dcfg = resolve_distill(run.cfg, teacher or build_role(run, "teacher"),
                                   student or build_role(run, "student"))
    return run.dcfg


def is_saved(folder: str, name: str) -> bool:
    """Whether the model `name` is in a run folder (a .safetensors file or a Hugging Face folder)."""
    return os.path.isfile(os.path.join(folder, f"{name}.safetensors")) or is_model_folder(os.path.join(folder, name))


def require_saved(folder: str, name: str) -> str:
    """The model `name` in a run folder (a .safetensors file or a Hugging Face folder), or a clear error
    naming the stage that makes it."""
    path = os.path.join(folder, f"{name}.safetensors")
    if is_saved(folder, name):
        return path if os.path.isfile(path) else os.path.join(folder, name)
    how = (" with the baseline (baseline: true, and without --no-baseline): the student trained without "
           "distillation" if name == SCRATCH else "")
    raise UserError(f"{os.path.join(folder, name)} (.safetensors, or a Hugging Face folder): missing; run the stage "
                    f"that makes it first (distill run, or distill {stage_command(name)}){how}")


def load_saved(run: RunDir, name: str) -> nn.Module:
    return load_model_at(require_saved(run.out, name), name)


def require_same_data(folder: str, name: str, data: DataBundle) -> None:
    """Model `name` of a run folder was trained on `data`, the data its recipe gives now, by its stage's record:
    a data file edited since, or a split made otherwise, would put rows it trained on in the test split it is
    evaluated, compressed, measured or exported on. (Runs made before the record pass: they have none. A run's
    own stages need no such check: each is trained again when its data changed.)"""
    record = read_run_json(os.path.join(folder, "stages.json"), {}).get(name)
    then = record.get("data_split") if isinstance(record, dict) else None
    if then and then != data.split_fingerprint:
        again = f"distill compress {shlex.quote(folder)}` again (with its compress.steps" \
            if name.startswith("compress/") else f"distill run {shlex.quote(folder)}` again (to retrain it"
        raise UserError(f"{os.path.join(folder, name)}: trained on other data than the recipe gives now (a data "
                        f"file or setting changed since: its test split may hold rows it trained on); run `{again}), "
                        f"or restore the data")


def load_model_at(path: str, name: str) -> nn.Module:
    """A model a stage saved: a Hugging Face folder, or a .safetensors file that names its architecture."""
    if os.path.isdir(path):
        from ..models.hf_lm import is_causal_lm_config
        from ..models.hf import OFFLINE, refuse_remote_code, transformers_module
        refuse_remote_code(path, name)
        try:
            config = transformers_module().AutoConfig.from_pretrained(path, **OFFLINE)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a Hugging Face model folder ({str(e).splitlines()[0]})") from None
        return load_causal_lm(path, name) if is_causal_lm_config(config) else load_folder(path, name)
    meta = load_meta(path)
    if not all(k in meta for k in ("spec", "input_shape", "num_classes")):
        raise UserError(f"{path}: not a model file that distill saved (its header lacks the architecture); was it "
                        f"replaced? Restore it, or remove it and run the stage that makes it again")
    model = build_model(meta["spec"], tuple(meta["input_shape"]), meta["num_classes"], where=name, training=False)
    if "structure" in meta:  # pruned by `distill compress`: rebuild its smaller shape before loading
        from ..compress.structure import fit_to_shapes, saved_shapes
        fit_to_shapes(model, saved_shapes(path), meta["structure"]["drop"])
    load_weights(model, path, name)
    return model


def require_run_folder(folder: str) -> None:
    """A folder that `distill run` wrote (its recipe.yaml), for the commands that take nothing else."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a run folder; give the folder of a finished run (distill run ... --out DIR)")
    if not os.path.isfile(os.path.join(folder, "recipe.yaml")):
        raise UserError(f"{folder}: not a run folder (no recipe.yaml); "
                        f"{seeds_hint(folder) or 'give the folder that `distill run` wrote'}")


def finish_command(folder: str) -> str:
    """The command that finishes a run folder without metrics.json: a stage stopped midway (checkpoints, or a
    stage record left unfinished) resumes; every model saved needs only its evaluation."""
    stages = read_run_json(os.path.join(folder, "stages.json"), {})
    stopped = any(isinstance(r, dict) and r.get("fingerprint") == UNFINISHED for r in stages.values()) or \
        glob.glob(os.path.join(glob.escape(folder), "checkpoints", "*", "step-*.pt"))
    if stopped:
        return f"distill run {shlex.quote(folder)} --resume"
    if STUDENT in stages and all(isinstance(r, dict) for r in stages.values()):  # (none unfinished: said above)
        return f"distill evaluate {shlex.quote(folder)}"
    return f"distill run {shlex.quote(folder)}"


def require_run(folder: str, command: str) -> None:
    """A finished run folder (recipe.yaml and metrics.json) for `distill COMMAND`, or one clear line saying
    what is missing."""
    require_run_folder(folder)
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        seeds = (f" (a multi-seed run: {command} one seed folder, e.g. seed_0)"
                 if os.path.isfile(os.path.join(folder, "summary.json")) else "")
        raise UserError(f"{path}: missing; the run is not finished{seeds}: {finish_command(folder)} finishes it")
    from ..evaluate import COLUMNS
    numbers = {k for k, _, _ in COLUMNS} | {"val_accuracy", "selected_epoch", "train_time_s"}  # (tables compute)
    metrics = read_run_json(path)
    for role, m in metrics.items():  # (a file edited by hand: one line, not a traceback in report or doctor;
        bad = next((k for k, v in m.items() if k in numbers and v is not None and (  # entries of other shapes
            isinstance(v, bool) or not isinstance(v, (int, float)))), None) if isinstance(m, dict) else None
        if bad:  # are passed over)
            raise UserError(f"{path}: {role}: '{bad}' is not a number; re-create it with distill evaluate "
                            f"{shlex.quote(folder)}")
    why = metrics_out_of_date(folder, metrics)
    if why:
        raise UserError(f"{path}: {why}; finish that run (distill run {shlex.quote(folder)}, with --resume if it was "
                        f"stopped)")
