"""A run folder: the resolved recipe, the data, and the bookkeeping of which stages are done.

Making a `RunDir` builds and writes nothing; the folder and its `recipe.yaml` are written by the first stage
that runs (`open`). Only the main process writes.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence

from ..checkpoint import Checkpoints
from ..data import DataBundle, load_data
from ..engine.runtime import Runtime
from ..errors import UserError
from ..io import append_jsonl, read_run_json, sha256_json, write_json, write_text
from ..launch import is_main_process
from ..logbook import summary_writer_class
from ..recipe import Recipe
from ..recipe_schema import SCHEMA
from ..roles import SCRATCH, STUDENT, TEACHER, is_assistant, recipe_section

# What `distill run` and the commands after it write at the top of a run folder, besides the models (one file or
# folder per role: teacher, student, student_scratch, assistant_N, and the teacher's samples).
BINARY_METRICS = ("auc", "sensitivity", "specificity")  # (of a positive class: for two classes only)
RUN_RECORDS = ("recipe.yaml", "metrics.json", "stages.json", "log.jsonl", "soft_labels.json", "summary.json",
               "chain.json", "doctor.json", "report.html", "checkpoints", "compress", "bench", "export", "tensorboard",
               "trials.json")
# A search's trials share one folder, where each trial trains the students again. Their records are kept by
# fingerprint in trials.json (remember=True), so that a search run again skips the trials it finished, and
# the trial it stopped in resumes from its checkpoints: training an earlier trial again would drop them.
# (The students are the leaves of a search's stages: no later stage reads their files.)
REMEMBERED = (SCRATCH, STUDENT)
TRIAL_ASIDE = "trial-"  # checkpoints/<stage>.trial-<fingerprint>: another trial's checkpoints, set aside


def made_by_a_run(entry: str) -> bool:
    """Whether a top-level name in a folder is one a run writes (so that writing there would replace it)."""
    stem = entry.split(".")[0]
    model = (stem in (TEACHER, STUDENT, SCRATCH) or is_assistant(stem)) and entry[len(stem):] in ("", ".safetensors")
    return entry in RUN_RECORDS or model or stem == "teacher_samples"  # (not student.onnx, an export of it)


# What a folder of several runs holds at its top: a --seeds run's summary.json and seed_<s>/, a search's records
# and trials/ (their runs are inside, in folders of their own)
RUNS_RECORDS = ("summary.json", "search.json", "search.md", "search.png", "best.yaml", "trials")


SEED_FOLDER = re.compile(r"seed_\d+")


def seed_folder(base: str, seed: int) -> str:
    """The run folder of one seed of `distill run --seeds` in its folder `base`."""
    return os.path.join(base, f"seed_{seed}")


def holds_runs(folder: str) -> bool:
    """A --seeds folder (summary.json beside seed_<s>/) or a search's (search.json or best.yaml beside trials/)."""
    def has(name: str) -> bool:
        return os.path.exists(os.path.join(folder, name))
    seeds = os.path.isdir(folder) and any(SEED_FOLDER.fullmatch(e) for e in os.listdir(folder))
    return (has("summary.json") and seeds) or ((has("search.json") or has("best.yaml")) and has("trials"))


def refuse_other_records(out: str, kind: str) -> None:
    """A --seeds (`kind` "seeds") or search folder is not given another kind's folder, nor files of the names
    it writes that no earlier run of it wrote (a user's best.yaml or summary.json): it would replace them."""
    if os.path.exists(out) and not os.path.isdir(out):  # (found at the first trial's or seed's folder, after work)
        raise UserError(f"--out {out}: a file, not a folder; choose a folder (new, or an earlier "
                        f"{'--seeds run' if kind == 'seeds' else kind}'s)")
    if not os.path.isdir(out):
        return
    entries = os.listdir(out)
    seeds = [e for e in entries if e == "summary.json" or SEED_FOLDER.fullmatch(e)]
    search = [e for e in entries if e in RUNS_RECORDS and e != "summary.json"]
    mine, other = (seeds, search) if kind == "seeds" else (search, seeds)
    if other:
        whose = "a search" if kind == "seeds" else "a --seeds run"
        raise UserError(f"--out {out}: holds {sorted(other)[0]}, of {whose}; choose another folder")
    # (the seeds' folders and the trials' are run folders, which check their own files)
    runs = [e for e in mine if SEED_FOLDER.fullmatch(e)] if kind == "seeds" else ["trials"]
    found = sorted(e for e in mine if e not in runs)
    if found and not any(os.path.isfile(os.path.join(out, e, "recipe.yaml")) for e in runs):
        raise UserError(f"--out {out}: holds {', '.join(found)}, which no earlier "
                        f"{'--seeds run' if kind == 'seeds' else 'search'} here wrote and this one would replace; "
                        f"choose another folder, or move them")


def made_by_runs(entry: str) -> bool:
    """Whether a top-level name in a folder of several runs is one they write."""
    return entry in RUNS_RECORDS or SEED_FOLDER.fullmatch(entry) is not None


AFTER_TRAINING = ("output", "compress", "bench", "baseline")  # keys that do not change the trained models


def run_folder(recipe: Recipe, out: Optional[str] = None) -> str:
    """--out, else the run folder the recipe was read from (as `distill run FOLDER`), else the recipe's
    output.dir, else runs/<name>."""
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise UserError(f"out: expected a folder path, got {type(out).__name__} {out!r:.60}")
    return os.path.expanduser(out or getattr(recipe, "folder", None) or recipe.cfg["output"]["dir"]
                              or os.path.join("runs", recipe.cfg["name"]))


def refuse_recipe_overwrite(recipe: Recipe, folder: str, out_given: bool = False) -> None:
    """A run writes its resolved recipe.yaml into its folder: never over the user's recipe file it was loaded
    from (a recipe.yaml whose output.dir is its own folder lost its comments and defaults left out). A run's own
    recipe.yaml (a folder a run wrote in, or a file in the resolved form a run writes) is its to rewrite;
    `out_given`: --out names that folder, refused even so (the command line gave a file, not the run folder)."""
    mine = os.path.join(folder, "recipe.yaml")
    source = recipe.source
    if not (os.path.isfile(mine) and os.path.isfile(source) and os.path.samefile(mine, source)):
        return
    ran = any(os.path.isfile(os.path.join(folder, f)) for f in ("stages.json", "log.jsonl")) or _resolved(mine)
    if ran and not out_given:  # (a run's own recipe.yaml: its to rewrite)
        return
    if out_given:
        where, instead = f"--out {folder}", "--out"
    elif recipe.cfg["output"]["dir"]:
        where, instead = f"output.dir: {folder}", "output.dir (or --out)"
    else:  # (`distill run FOLDER`, a folder of the user's recipe.yaml, not a run's)
        raise UserError(f"{folder}: not a run folder: its recipe.yaml is yours, and a run writes its resolved "
                        f"recipe.yaml over it; run the file into another folder (--out)")
    raise UserError(f"{where}: the folder of {source} itself, where the run writes its resolved recipe.yaml "
                    f"over yours; give another {instead}")


def _resolved(path: str) -> bool:
    """The file is a recipe as a run writes it (a run stopped before its first record left it so)."""
    from ..recipe import read_yaml
    try:
        with open(path, encoding="utf-8") as f:
            return Recipe.from_dict(read_yaml(path), source=path).to_yaml() == f.read()
    except (UserError, OSError, UnicodeDecodeError):
        return False


def is_run_folder(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("recipe.yaml", "stages.json"))


def refuse_inside_a_run(out: str, what: str = "") -> None:
    """A run folder inside another run's (its compress/, or --seeds or search folders made there): that run
    would take the files of this one for its own (`distill export --model compress/teacher`). `what`: `out`
    holds the folders of several runs (--seeds, a search), and is checked itself too."""
    if what and is_run_folder(out):
        raise UserError(f"--out {out}: a run folder; {what} would be mixed with its files; choose another folder")
    folder = os.path.dirname(os.path.abspath(out))
    while True:
        if is_run_folder(folder):
            raise UserError(f"--out {out}: inside the run folder {folder}, which would take what this run writes "
                            f"for its own; choose a folder outside it")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _differing(a: Any, b: Any, prefix: str = "") -> List[str]:
    """The dotted keys whose values differ between two recipe dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "the recipe"] if a != b else []
    return [k for key in sorted(set(a) | set(b), key=str)
            for k in _differing(a.get(key), b.get(key), f"{prefix}{key}" if not prefix else f"{prefix}.{key}")]


def _comparable(cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What makes two recipes the same run: not the keys that leave the trained models as they are (output,
    compress, bench, baseline), nor where and how long it runs (train.device, train.timeout_s; a device
    that rounds differently is in the stages' fingerprints)."""
    def placeless(train: Any) -> Any:
        return {k: v for k, v in train.items() if k not in ("device", "timeout_s")} if isinstance(train, dict) \
            else train
    out = {k: v for k, v in (cfg or {}).items() if k not in AFTER_TRAINING}
    if "train" in out:
        out["train"] = placeless(out["train"])
    for role in (TEACHER, STUDENT):
        if isinstance(out.get(role), dict) and "train" in out[role]:
            out[role] = {**out[role], "train": placeless(out[role]["train"])}
    return out


def recipe_key(cfg: Dict[str, Any]) -> str:
    """A short hash of what makes a run this run (`_comparable`): metrics.json records the one it measured."""
    return sha256_json(_comparable(cfg))[:16]


def _listed(keys: List[str]) -> str:
    """The first keys of a list, for a one-line error."""
    return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")


# keys of how models are measured (and named), not of how they are made
MEASURING = ("evaluate.", "data.eval_batch_size", "data.workers", "name", "description")


def refuse_other_recipe(out: str, cfg: Dict[str, Any]) -> None:
    """A folder holding a run of another recipe is not silently mixed with this one."""
    old = os.path.join(out, "recipe.yaml")
    if not os.path.isfile(old):
        return
    try:
        before = Recipe.load(old).cfg
    except UserError as e:  # (a key it held is refused now, say)
        raise UserError(f"{out}: the folder's recipe.yaml no longer loads ({e}); choose another folder (--out), or "
                        f"give --overwrite to replace it") from None
    # (data.workers, how many processes load the batches, leaves the draws as they are: a resume may change it)
    keys = [k for k in _differing(_comparable(before), _comparable(cfg)) if k != "data.workers"]
    if keys:
        raise UserError(f"{out}: the folder holds a run of a different recipe ({_listed(keys)} differ); choose "
                        f"another folder (--out), or give --overwrite to replace it (unchanged stages are still "
                        f"reused); distill compress and bench may change only {_after_training()}")


def _after_training() -> str:
    """The keys of AFTER_TRAINING, as a refusal names them."""
    return ", ".join(k if k == "baseline" else k + ".*" for k in AFTER_TRAINING)  # (baseline: a switch)


def refuse_training_keys(out: str, cfg: Dict[str, Any], command: str = "bench") -> None:
    """distill bench measures a folder's models as they were made, and compress starts from them: a --set of
    a key they would have to be made again for would be ignored, and is refused (compress.*, and for bench
    how the models are measured, may change)."""
    try:
        before = Recipe.load(os.path.join(out, "recipe.yaml")).cfg
    except UserError:
        return  # (the commands that make the models say what is wrong with it)
    free = MEASURING if command == "bench" else ()
    trained = [k for k in _differing(_comparable(before), _comparable(cfg)) if not k.startswith(free)]
    if trained:
        does = "measures the folder's models as they were trained, without this change" if command == "bench" else \
            f"changes only {_after_training()} of the folder's recipe (its models were made with the rest)"
        raise UserError(f"{_listed(trained)}: distill {command} {does}; give it to distill run {shlex.quote(out)} "
                        f"--overwrite (which trains again what it changes), or leave it out")


UNFINISHED = "unfinished"  # the fingerprint of a stage record while the stage makes its files anew


def require_current(out: str, name: str, path: str, command: str, made_for: Optional[str] = None) -> None:
    """A model is measured, compressed or exported only as the folder's recipe made it: not one whose stage was
    started again and stopped (its record `unfinished`), nor one made by a run of another recipe than the
    folder's (recipe.yaml was changed since, by a run or a stage command that stopped before it made this model
    again). `path`: its file or folder, as the refusal names it. `made_for`: the recipe key it must hold
    (evaluate: the folder's before this command rewrites it), else that of recipe.yaml as saved (a command's
    own --set, bench's evaluate.threads, does not make the folder's models another recipe's)."""
    record = read_run_json(os.path.join(out, "stages.json"), {}).get(name)
    if not isinstance(record, dict):
        return
    maker = "compress" if name.startswith("compress/") else "run"
    again = f"distill {maker} {shlex.quote(out)} --resume"  # (the command that makes it)
    if record.get("fingerprint") == UNFINISHED:
        raise UserError(f"{name}: a run that started making it again stopped before it finished; finish the run "
                        f"first ({command} needs it): {again}")
    made = record.get("recipe")  # (records from before the key: none)
    if made is not None and made != (made_for or recipe_key(Recipe.load_run_folder(out).cfg)):
        raise UserError(f"{path}: made by a run of another recipe than "
                        f"{os.path.join(out, 'recipe.yaml')} (a rerun that changed it stopped before making this "
                        f"model again); finish the run first ({command} needs it): {again}")


def stage_fingerprints(folder: str) -> Dict[str, Optional[str]]:
    """Each stage's fingerprint in a run folder's stages.json (a model's changes when it is trained again)."""
    stages = read_run_json(os.path.join(folder, "stages.json"), {})
    return {k: v.get("fingerprint") for k, v in stages.items() if isinstance(v, dict)}


def metrics_out_of_date(folder: str, metrics: Any) -> Optional[str]:
    """Why a run folder's metrics.json no longer describes its models (None when it does): a rerun that
    rewrote recipe.yaml, or retrained a model, and stopped before its evaluation rewrote the metrics. Each
    model's metrics record its stage fingerprint and the recipe's key (files from before have neither)."""
    if not isinstance(metrics, dict):
        return None
    measured = {k: m for k, m in metrics.items() if isinstance(m, dict)}
    now = stage_fingerprints(folder)
    # (a model whose stage record is gone, with stages.json, says nothing: only another fingerprint is a change)
    stale = [k for k, m in measured.items() if "fingerprint" in m and k in now and m["fingerprint"] != now[k]]
    if stale:
        return f"measured earlier versions of {', '.join(stale)}, trained again since by a run that did not finish"
    keys = {m["recipe"] for m in measured.values() if "recipe" in m}
    if keys:
        try:
            current = recipe_key(Recipe.load(os.path.join(folder, "recipe.yaml")).cfg)
        except UserError:
            return None  # (the command that reads the recipe says what is wrong with it)
        if keys != {current}:
            return "measured under another recipe than its recipe.yaml, which a run that did not finish rewrote"
    return None


def student_tokenizer(cfg: Dict[str, Any]) -> Optional[str]:
    """The folder of a causal-LM student (`student.hf`) whose tokenizer is not the data's (the teacher's);
    None when they share one. Such a student can learn only from the text the teacher writes (sequence-level
    KD): it, and its baseline, read every split in its own tokens."""
    from ..models.hf import resolve_hf_path
    from ..models.hf_lm import same_tokenizer
    from ..recipe_schema import COMPLETIONS
    hf = cfg[STUDENT]["hf"]
    if cfg["data"]["dataset"] not in COMPLETIONS or not hf:
        return None
    path = resolve_hf_path(hf, "student.hf")
    return None if same_tokenizer(path, cfg["data"]["tokenizer"], "student.hf") else path


def data_cfg_for(cfg: Dict[str, Any], name: str, own: Any = False) -> Dict[str, Any]:
    """The `data` section as model `name` reads it: the student (and its baseline) of another tokenizer in
    its own tokens (`own`: that tokenizer when known, else it is looked up); every other model (the teacher,
    a compressed teacher) in the teacher's."""
    if name not in (STUDENT, SCRATCH):
        return cfg["data"]
    own = student_tokenizer(cfg) if own is False else own
    return {**cfg["data"], "tokenizer": own} if own else cfg["data"]


def check_run(run: Any, what: str) -> "RunDir":
    """The stage functions' first argument (train_teacher, soft_labels, train_student): a RunDir, the folder
    the stage reads and writes; a Recipe is a common slip (run() and run_seeds() take one)."""
    if not isinstance(run, RunDir):
        raise UserError(f"{what}: expected a RunDir (RunDir(recipe, out)), got {type(run).__name__} {run!r:.60}; "
                        f"run(recipe, out) runs every stage")
    return run


def check_recipe(recipe: Any) -> Recipe:
    """The Python API's first argument: a Recipe object (a name or path is a common slip), validated again
    (its cfg may have been changed in Python): the recipe to run."""
    if not isinstance(recipe, Recipe):
        raise UserError(f"expected a Recipe (Recipe.load(name or path) or Recipe.from_dict(dict)), got "
                        f"{type(recipe).__name__} {recipe!r:.60}")
    made, cfg = getattr(recipe, "made", None), recipe.cfg
    top = cfg["train"] if isinstance(made, dict) and isinstance(cfg, dict) and isinstance(cfg.get("train"), dict) \
        else {}
    roles = [r for r in (TEACHER, STUDENT) if isinstance(cfg.get(r), dict) and isinstance(cfg[r].get("train"), dict)]
    for key, value in top.items():
        before = made["train"].get(key)
        # (the roles were filled from it when the recipe was made: a change does nothing to those that still
        # hold the value it had then; one whose own value differs, as digits' teacher's epochs, never took it)
        stale = [r for r in roles if cfg[r]["train"].get(key, value) == before]
        if value != before and stale:
            holds = f"{' and '.join(f'{r}.train.{key}' for r in stale)} still hold{'s' if len(stale) == 1 else ''}"
            raise UserError(f"recipe.cfg['train']['{key}'] was changed to {value!r} after the recipe was made, and "
                            f"{holds} {before!r}: make the "
                            f"recipe with the change (Recipe.load(name, ['train.{key}=...']) or Recipe.from_dict), or "
                            f"set those too")
    checked = Recipe.from_dict(cfg, source=recipe.source)
    checked.folder = getattr(recipe, "folder", None)
    return checked


class RunDir:
    def __init__(self, recipe: Recipe, out: Optional[str] = None, echo=print, resume: bool = False,
                 overwrite: bool = False, tensorboard: bool = False, drop_checkpoints: bool = False) -> None:
        """`overwrite`: --overwrite (another recipe's run, other files, and stale checkpoints may be replaced);
        `drop_checkpoints`: only the last (distill compress --overwrite)."""
        recipe = check_recipe(recipe)
        if not callable(echo):
            raise UserError(f"echo: expected a function that takes a line of text (print, or lambda line: None), got "
                            f"{echo!r:.60}")
        self.drop_checkpoints = overwrite or drop_checkpoints
        self.recipe, self.cfg = recipe, recipe.cfg
        self.out = run_folder(recipe, out)
        refuse_recipe_overwrite(recipe, self.out)
        self.echo, self.resume = echo, resume
        self.fingerprints: Dict[str, str] = {}  # stage -> fingerprint, of the stages run (run_stage sets them)
        self.records: Dict[str, Any] = {}  # stage -> its record, of the stages run or reused by this process
        self.tensorboard = self.path("tensorboard") if tensorboard else None
        if self.tensorboard:  # (both reported before anything is written)
            if os.path.exists(self.tensorboard) and not os.path.isdir(self.tensorboard):
                raise UserError(f"--tensorboard: {self.tensorboard} is a file; TensorBoard writes a folder there")
            summary_writer_class()
        self.log = self.path("log.jsonl")
        self.on_epoch = None  # called after each epoch of the distilled student: (epoch, record)
        self.remember = False  # a search's trials: see REMEMBERED
        self._opened = False
        self._refuse_other_run(overwrite)
        self._refuse_other_files(overwrite)
        refuse_inside_a_run(self.out)
        if is_main_process():
            for warning in recipe.warnings:  # (settings that do nothing here: said, not refused)
                echo(f"warning: {warning}")

    def _refuse_other_run(self, overwrite: bool) -> None:
        if not overwrite:
            refuse_other_recipe(self.out, self.cfg)

    def _refuse_other_files(self, overwrite: bool) -> None:
        """A run does not replace files it did not write: a folder without recipe.yaml that holds names a run
        writes (a metrics.json, a teacher.safetensors of the user's) is refused unless --overwrite. Other files
        (a job's log, .DS_Store) are left beside the run."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UserError(f"--out {self.out}: not a folder (a file, a device or a pipe); give a folder for the run")
        if overwrite or not os.path.isdir(self.out) or os.path.isfile(self.path("recipe.yaml")):
            return
        clash = sorted(e for e in os.listdir(self.out) if made_by_a_run(e))
        if clash:
            raise UserError(f"{self.out}: not a run folder (no recipe.yaml), and it holds {', '.join(clash[:3])}"
                            f"{', ...' if len(clash) > 3 else ''}, which the run would replace; give a new or empty "
                            f"folder (--out), or pass --overwrite to replace them")

    def open(self) -> None:
        """Create the folder and write the resolved recipe (once; before the first stage writes anything)."""
        if self._opened or not self.runtime.is_main:
            return
        try:
            os.makedirs(self.out, exist_ok=True)
            write_text(self.path("recipe.yaml"), self.recipe.to_yaml())
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write the run folder ({e.strerror})") from None
        self._opened = True

    @cached_property
    def data(self) -> DataBundle:
        try:
            data = load_data(self.cfg["data"])
        except UserError as e:  # (data.tokenizer filled from teacher.hf: name what the user gave)
            said, tok = str(e), self.cfg["data"].get("tokenizer")
            if tok and tok == self.cfg["teacher"].get("hf") and said.startswith("data.tokenizer: "):
                raise UserError("teacher.hf" + said[len("data.tokenizer"):]) from None
            raise
        positive = self.cfg["evaluate"]["positive_class"]
        two_classes = data.task == "classification" and data.num_classes == 2
        if two_classes and positive > 1:  # (before any training)
            raise UserError(f"evaluate.positive_class: {positive}, and the data has 2 classes "
                            f"({', '.join(data.class_names)}): give 0 or 1")
        if positive != SCHEMA["evaluate"]["positive_class"].default and not two_classes and is_main_process():
            what = f"has {data.num_classes} classes" if data.task == "classification" else f"is {data.task}"
            self.echo(f"warning: evaluate.positive_class: {positive} does nothing: the data {what} (it names the "
                      f"class that {', '.join(BINARY_METRICS)} score, with two classes)")
        metrics = self.cfg["evaluate"]["metrics"]
        if data.task == "classification" and data.num_classes > 2 and set(metrics) <= set(BINARY_METRICS):
            raise UserError(f"evaluate.metrics: {metrics} are for two classes, and the data has "
                            f"{data.num_classes}: no test metric would be measured; add accuracy or macro_f1")
        subset, rows = self.cfg["data"].get("train_subset"), data.train_rows
        if subset and rows is not None and subset >= rows and data.task == "classification" and is_main_process():
            self.echo(f"warning: data.train_subset={subset}: the data has {rows:,} training rows, so it keeps "
                      f"every one")  # (a setting that does nothing, said as the recipe's are)
        return data

    @cached_property
    def student_tokenizer(self) -> Optional[str]:
        return student_tokenizer(self.cfg)

    @cached_property
    def _student_data(self) -> DataBundle:
        return load_data(data_cfg_for(self.cfg, STUDENT, self.student_tokenizer))

    def data_for(self, name: str) -> DataBundle:
        """The data as model `name` reads it: the teacher's tokens, or the student's own (`student_tokenizer`)."""
        return self._student_data if name in (STUDENT, SCRATCH) and self.student_tokenizer else self.data

    @cached_property
    def runtime(self) -> Runtime:
        return Runtime.from_name(self.cfg["train"]["device"], self.cfg["train"]["timeout_s"])

    def train_cfg(self, role: str) -> Dict[str, Any]:
        """The resolved `train` section of the teacher, or of the students (assistants, compress fine-tunes)."""
        return self.cfg[recipe_section(role)]["train"]

    def data_cfg(self, role: str) -> Dict[str, Any]:
        """The `data` section as the model `role` trains on it: its own augmentation (`<section>.augment`)."""
        return {**self.cfg["data"], "transforms": self.cfg[recipe_section(role)]["augment"]}

    def own_augment(self, role: str) -> Optional[Dict[str, Any]]:
        """The model's augmentation where it is not data.transforms' (None there: the data's fingerprint already
        holds that), for the fingerprints of the stages it trains and for naming the key in errors."""
        augment, data = self.cfg[recipe_section(role)]["augment"], self.cfg["data"]["transforms"]
        return None if augment == {k: data[k] for k in augment} else augment

    def checkpoints(self, role: str) -> Checkpoints:
        return Checkpoints(self.path(os.path.join("checkpoints", role)), self.train_cfg(role)["keep_checkpoints"],
                           self.echo, self.fingerprints.get(role))

    def check_checkpoints(self, name: str, fingerprint: str, earlier: Optional[str] = None) -> None:
        """--resume continues a stage from its checkpoints only if they were written by the stage with the same
        inputs: else the state of other data, another teacher or recipe would be trained on. Refused, keeping
        them; with --overwrite (the recipe changed on purpose) they are dropped and the stage starts over.
        Without --resume, checkpoints this very stage could continue from are not dropped unasked: refused
        unless --overwrite, so that a command repeated without --resume loses no training."""
        ck = self.checkpoints(name)
        if self.remember and self.runtime.is_main:
            self._trial_checkpoints(ck, fingerprint, earlier)
        step, writer = self.runtime.from_main((ck.newest_step(), ck.written_by()))
        if step is None:
            return
        # (written by this stage with these inputs, or by it before a later key was hashed, or not known otherwise)
        own = writer in (None, fingerprint, earlier)
        if self.resume and own:
            return  # (resumed from them)
        if not self.drop_checkpoints:
            if self.resume:
                raise UserError(f"--resume: {ck.folder} was written by the {name} stage of other inputs (its data, "
                                f"teacher or settings have changed since); restore them to continue, or pass "
                                f"--overwrite to drop them and start the stage over")
            if own:
                raise UserError(f"{ck.folder}: checkpoints of this {name} stage, stopped at step {step}; continue "
                                f"with --resume, or pass --overwrite to drop them and start the stage over")
        why = f"stopped at step {step}" if own else "of other inputs"
        self.event(f"warning: {ck.folder}: checkpoints of the {name} stage {why}; dropped, the stage starts over",
                   model=name, dropped_checkpoints=ck.folder)
        if self.runtime.is_main:
            ck.clear()

    @staticmethod
    def _trial_checkpoints(ck: Checkpoints, fingerprint: str, earlier: Optional[str] = None) -> None:
        """A search's trials train one after another in one folder: the checkpoints of another trial (the one a
        stopped search stopped in, met again after trials it reruns: pruned or diverged ones) are set aside
        beside the folder, named by their fingerprint, not dropped; and this trial's, set aside, come back.
        (`earlier`: this stage's fingerprint before a later key was hashed; its checkpoints are its own.)"""
        writer = ck.written_by()
        if writer not in (None, fingerprint, earlier):
            os.replace(ck.folder, f"{ck.folder}.{TRIAL_ASIDE}{writer[:24]}")
        aside = f"{ck.folder}.{TRIAL_ASIDE}{fingerprint[:24]}"
        if os.path.isdir(aside) and ck.newest_step() is None:
            shutil.rmtree(ck.folder, ignore_errors=True)
            os.replace(aside, ck.folder)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def stages(self) -> Dict[str, Any]:
        stages = read_run_json(self.path("stages.json"), {})
        odd = [k for k, v in stages.items() if not (isinstance(v, dict) and isinstance(v.get("fingerprint"), str))]
        if odd:
            raise UserError(f"{self.path('stages.json')}: the record of {odd[0]} is not one distill wrote; restore "
                            f"the file, or remove it to run every stage again")
        return stages

    def stage_done(self, name: str, fingerprint: str, files: Sequence[str]) -> Optional[Dict[str, Any]]:
        rec = self.stages().get(name)
        if rec and rec["fingerprint"] == fingerprint and all(os.path.exists(self.path(f)) for f in files):
            return rec
        if self.remember and name in REMEMBERED:
            rec = read_run_json(self.path("trials.json"), {}).get(name, {}).get(fingerprint)
            return {**rec, "remembered": True} if isinstance(rec, dict) else None
        return None

    def mark_reused(self, name: str) -> None:
        """A stage reused by this recipe, or a saved model a stage command builds on, is this recipe's (its
        record names the recipe a model was made for; recipe.yaml is written first)."""
        stages = self.stages()
        if self.runtime.is_main and name in stages and stages[name].get("recipe") != recipe_key(self.cfg):
            self.open()
            stages[name]["recipe"] = recipe_key(self.cfg)
            write_json(self.path("stages.json"), stages)

    def folder_recipe_key(self) -> str:
        """The key of the recipe the folder's models are to be of: its recipe.yaml as it is before this command
        writes its own (`evaluate --overwrite` with other settings measures the folder's models by the user's
        choice), else this recipe's. A stage record of another key was made by a rerun that changed the recipe
        and stopped before it reached that stage."""
        before = self._folder_cfg()
        return recipe_key(before if before is not None else self.cfg)

    def _folder_cfg(self) -> Optional[Dict[str, Any]]:
        """The folder's recipe.yaml as it is before this command writes its own; None when there is none, it no
        longer loads, or this command has written it."""
        try:
            if not self._opened and os.path.isfile(self.path("recipe.yaml")):
                return Recipe.load(self.path("recipe.yaml")).cfg
        except UserError:
            pass
        return None

    def measuring_changes(self) -> Optional[str]:
        """For `distill evaluate --overwrite` with other settings (it trains nothing): the key of the folder's
        recipe that this one replaces when only how the models are measured changed (evaluate.*, the evaluation
        batch); refused when a change is one the models would have to be trained again for (recipe.yaml would
        then describe models the folder does not hold). None when nothing changed."""
        before = self._folder_cfg()
        if before is None:
            return None
        changed = _differing(_comparable(before), _comparable(self.cfg))
        # (how answers are found and checked also picks the teacher's completions that sequence KD keeps, and
        # the epochs that val_exact_match selects: then it is a training key too)
        trains = bool(self.cfg["distill"]["sequence_kd"]["samples"]) or any(
            self.cfg[r]["train"]["select_metric"] == "val_exact_match" for r in (TEACHER, STUDENT))
        trained = [k for k in changed
                   if not k.startswith(MEASURING) or (trains and k.startswith("evaluate.exact_match"))]
        if trained:
            own = os.path.abspath(self.recipe.source) == os.path.abspath(self.path("recipe.yaml"))
            command = f"distill run {shlex.quote(self.out)}" if own else \
                f"distill run {shlex.quote(self.recipe.source)} --out {shlex.quote(self.out)}"
            raise UserError(f"{_listed(trained)}: distill evaluate trains nothing, and the folder's models were "
                            f"trained without this change; give it to {command} --overwrite (which trains again "
                            f"what it changes), or leave it out")
        return recipe_key(before) if changed else None

    def restamp(self, old_key: str) -> None:
        """The stage records of the folder's recipe `old_key` marked as of this one (which changed only how
        the models are measured), so that the next command on the folder does not take them for a stopped rerun's."""
        stages = self.stages()
        for record in stages.values():
            if record.get("recipe") == old_key:
                record["recipe"] = recipe_key(self.cfg)
        write_json(self.path("stages.json"), stages)

    def mark_unfinished(self, name: str) -> None:
        """Before a stage makes its files anew: its record no longer describes them (a run killed after a file
        was replaced, before mark_done, would reuse the new file under the old record), and the models measured
        under the old fingerprint read as out of date until the stage is done."""
        stages = self.stages() if self.runtime.is_main else {}
        if name in stages:
            stages[name] = {**stages[name], "fingerprint": UNFINISHED}
            write_json(self.path("stages.json"), stages)

    def mark_done(self, name: str, fingerprint: str, info: Dict[str, Any]) -> None:
        if not self.runtime.is_main:
            return
        stages = self.stages()
        stages[name] = {"fingerprint": fingerprint, **info, "recipe": recipe_key(self.cfg)}
        write_json(self.path("stages.json"), stages)
        if self.remember and name in REMEMBERED:
            trials = read_run_json(self.path("trials.json"), {})
            trials.setdefault(name, {})[fingerprint] = stages[name]
            write_json(self.path("trials.json"), trials)
        self.remove_checkpoints(name)

    def remove_checkpoints(self, name: str, written_by: Optional[str] = None) -> None:
        """The checkpoints of stage `name`, done; `written_by`: only if that fingerprint wrote them (a stage
        reused whose run was stopped between its record and this: they would stay for good)."""
        folder = self.path(os.path.join("checkpoints", name))
        ck = Checkpoints(folder)
        if not self.runtime.is_main or (written_by is not None and ck.written_by() != written_by):
            return
        ck.clear()  # the stage is done (its step files before inputs.json, which names them)
        shutil.rmtree(folder, ignore_errors=True)
        while folder != self.out and os.path.isdir(os.path.dirname(folder)):  # and now-empty parents
            folder = os.path.dirname(folder)
            if os.listdir(folder) or folder == self.out:
                break
            os.rmdir(folder)

    def event(self, message: str, **fields: Any) -> None:
        if not self.runtime.is_main:
            return
        self.open()
        self.echo(message)
        append_jsonl(self.log, {"event": message, **fields})
