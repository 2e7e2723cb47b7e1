"""Recipes: YAML in, a validated and fully resolved dict out.

The whole recipe is checked before any work starts: an unknown key, a wrong type, a value out of
range or a missing file is one line naming the key path and the fix (a `UserError`, exit code 2).
YAML is read with a safe loader (RecipeLoader), so `!!python` tags are refused; nothing in a recipe is ever executed.
The keys and their checks are in recipe_schema.py, the rules across keys in recipe_checks.py.
"""
from __future__ import annotations

import copy
import glob
import os
import re
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .errors import UserError, did_you_mean
from .recipe_checks import _cross_checks, idle_settings, is_text
from .recipe_schema import BENCH_VARIANTS, COMPLETIONS, COMPRESS_STEPS, LM_DATASETS, METRICS, SCHEMA, TRAIN, F, \
    validate_section

__all__ = ["Recipe", "read_yaml", "bundled_recipes", "resolve_recipe_path", "apply_override", "is_text", "SCHEMA",
           "TRAIN", "METRICS", "COMPLETIONS", "LM_DATASETS", "COMPRESS_STEPS", "BENCH_VARIANTS", "validate_section"]


def apply_override(raw: Dict[str, Any], assignment: str) -> None:
    """`train.epochs=3` -> raw['train']['epochs'] = 3 (the value is read as YAML)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
    path, text = assignment.split("=", 1)
    if not text.strip():  # (read as null, it meant the default: a teacher trained where one was to be loaded)
        raise UserError(f"--set {path}: no value (is a shell variable unset?); give null to unset an optional key, "
                        f"'' for an empty text, or leave the key out for its default")
    try:
        value = load_yaml(text)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None)
        raise UserError(f"--set {path}: cannot read value {text!r}" + (f" ({why})" if why else "")) from None
    keys, node, schema = path.strip().split("."), raw, SCHEMA
    for i, key in enumerate(keys):
        if isinstance(schema, dict):
            if key not in schema:
                raise UserError(f"--set {path}: unknown key '{key}'{did_you_mean(key, schema)}")
            schema = schema[key]
        elif isinstance(schema, F) and dict not in schema.types:
            raise UserError(f"--set {path}: '{'.'.join(keys[:i])}' holds a value, not keys")
        if i == len(keys) - 1:
            if isinstance(value, bool) and isinstance(node.get(key), dict) and isinstance(schema, dict) \
                    and "enabled" in schema:  # (`monitor: off` over keys set before: a switch, they stay)
                node[key]["enabled"] = value
            else:
                node[key] = value
        else:
            if isinstance(node.get(key), bool) and isinstance(schema, dict) and "enabled" in schema:
                node[key] = {"enabled": node[key]}  # (`monitor: off` stays off when one of its keys is set)
            elif node.get(key) is not None and not isinstance(node.get(key), dict):  # (replaced silently, it
                # would be lost: the order of two --set decided which one counted)
                raise UserError(f"--set {path}: '{'.'.join(keys[:i + 1])}' is {node[key]!r} (the recipe or an "
                                f"earlier --set), not a section of keys")
            elif node.get(key) is None:
                node[key] = {}
            node = node[key]


def seeds_hint(folder: str) -> str:
    """What to give instead of the folder of a `--seeds` run (a run folder per seed, no recipe.yaml of its own)."""
    seeds = sorted(glob.glob(os.path.join(glob.escape(folder), "seed_*", "recipe.yaml")))
    if not seeds:
        return ""
    return (f"it holds the runs of --seeds ({len(seeds)}): give one, e.g. {os.path.dirname(seeds[0])}, or resume "
            f"them all with the --seeds command as first given, plus --resume")


class Recipe:
    """A validated, resolved recipe. `Recipe.load("digits")` or `Recipe.load("my.yaml", ["train.epochs=3"])`."""

    def __init__(self, cfg: Dict[str, Any], source: str = "<dict>") -> None:
        self.cfg, self.source = cfg, source
        self.made = copy.deepcopy(cfg)  # (as made: a cfg changed in Python afterwards is checked against it)
        self.warnings: List[str] = []  # settings that do nothing here (recipe_checks.idle_settings); a run says them
        self.folder: Optional[str] = None  # the run folder it was read from: where a run of it writes by default

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> "Recipe":
        raw = copy.deepcopy(raw) if raw is not None else {}
        if not isinstance(raw, dict):
            raise UserError(f"{source}: a recipe is a mapping of sections (data, teacher, student, ...)")
        overrides = _check_overrides(overrides)
        for i, a in enumerate(overrides):
            _refuse_replacing_earlier(overrides[:i], a)
            apply_override(raw, a)
        _top_level_train(raw, overrides, source)
        cfg = validate_section(raw, SCHEMA, "")
        _cross_checks(cfg)
        recipe = cls(cfg, source)
        recipe.warnings = idle_settings(cfg)
        return recipe

    @classmethod
    def load(cls, path_or_name: str, overrides: Sequence[str] = ()) -> "Recipe":
        """A recipe file, a bundled recipe's name, or a run folder (the recipe.yaml it saved)."""
        if not isinstance(path_or_name, (str, os.PathLike)):
            raise UserError(f"Recipe.load: expected a recipe file, a bundled recipe's name or a run folder, got "
                            f"{type(path_or_name).__name__}; for a dict, use Recipe.from_dict")
        path_or_name = os.fspath(path_or_name)
        if os.path.isfile(os.path.join(path_or_name, "recipe.yaml")):
            return cls.load_run_folder(path_or_name, overrides)
        path = resolve_recipe_path(path_or_name)
        return cls.from_dict(read_yaml(path), overrides, source=path)

    @classmethod
    def load_run_folder(cls, folder: str, overrides: Sequence[str] = ()) -> "Recipe":
        """The recipe a run folder saved (resolved: every model holds its whole `train` section)."""
        path = os.path.join(folder, "recipe.yaml")
        if not os.path.isfile(path):
            raise UserError(f"{folder}: not a run folder (no recipe.yaml); "
                            f"{seeds_hint(folder) or 'give a recipe file instead'}")
        raw = _unpinned_tokenizer(read_yaml(path), overrides)
        try:
            recipe = cls.from_dict(raw, overrides, source=path)
            recipe.folder = os.fspath(folder)  # (`distill run FOLDER` writes into it; so does run(recipe))
            return recipe
        except UserError as e:  # a fault of the saved recipe itself (not of a --set, which may repair it, say
            try:                # a data.path that moved) is named as the file's
                cls.from_dict(raw, source=path)
            except UserError:
                raise UserError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
            raise

    def __getitem__(self, key: str) -> Any:
        return self.cfg[key]

    def to_yaml(self) -> str:
        return dump_yaml(self.cfg, sort_keys=False)

    def model_cfg(self, role: str) -> Dict[str, Any]:
        return self.cfg[role]


def _unpinned_tokenizer(raw: Any, overrides: Sequence[str]) -> Any:
    """A saved recipe holds data.tokenizer resolved to the teacher's folder when it was left out. An override of
    the teacher then takes its own tokenizer, as the recipe would, not the earlier teacher's (which was kept:
    the other vocabulary was refused, or the same one rendered with the earlier chat template)."""
    if not isinstance(raw, dict):
        return raw  # (from_dict says what is wrong with it)
    keys = [o.split("=", 1)[0].strip() for o in overrides if isinstance(o, str)]
    data, teacher = raw.get("data"), raw.get("teacher")
    if isinstance(data, dict) and isinstance(teacher, dict) and data.get("tokenizer") and \
            data["tokenizer"] == teacher.get("hf") and {"teacher", "teacher.hf"} & set(keys) and \
            not {"data", "data.tokenizer"} & set(keys):
        raw["data"] = {**data, "tokenizer": None}
    return raw


def _check_overrides(overrides: Sequence[str]) -> List[str]:
    """`--set` values from Python: a list of 'KEY=VALUE' texts (one text would be read letter by letter)."""
    given = None if isinstance(overrides, (str, bytes)) or not hasattr(overrides, "__iter__") else list(overrides)
    if given is None or not all(isinstance(a, str) for a in given):  # (list(): a generator is read once)
        raise UserError(f"overrides: expected a list of 'KEY=VALUE' strings, got {overrides!r}")
    return given


def _refuse_replacing_earlier(earlier: Sequence[str], assignment: str) -> None:
    """`--set train.optimizer.lr=0.01 --set train.optimizer={name: sgd}`: the second replaces the section the
    first wrote into, and the order of the two would decide whether lr counts; refused, as the other order of a
    key set under a value is."""
    keys = assignment.split("=", 1)[0].strip().split(".")
    try:
        if isinstance(load_yaml(assignment.split("=", 1)[-1]), bool):
            return  # (a section's switch, `monitor=off`: it keeps the keys set before, see apply_override)
    except yaml.YAMLError:
        return  # (apply_override names the value)
    for e in earlier:
        inner = e.split("=", 1)[0].strip().split(".")
        if len(inner) > len(keys) and inner[:len(keys)] == keys:
            raise UserError(f"--set {'.'.join(keys)}: replaces the whole section that the earlier --set "
                            f"{'.'.join(inner)} wrote into (it would be lost); give the section first, then its keys")


def _top_level_train(raw: Dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """A top-level `--set train.KEY=V` reaches each model whose own `train` section does not set KEY. In a
    resolved recipe (a run folder's recipe.yaml) every model sets every key, so it would reach none: that is
    refused, naming the keys that do reach them, rather than left silently unapplied. The keys one per run
    (device, timeout_s) are set for every model that holds its own."""
    given = {a.split("=", 1)[0].strip() for a in overrides}
    for a in overrides:
        keys = a.split("=", 1)[0].strip().split(".")
        if keys[0] != "train" or len(keys) < 2 or not isinstance(raw.get("train"), dict):
            continue
        new, roles = _at(raw, keys), [r for r in ("teacher", "student") if isinstance(raw.get(r), dict)]
        own = {r: _at(raw[r], keys) for r in roles if _at(raw[r], keys) is not None}
        if keys[1] in ("device", "timeout_s"):  # (not over a model's own --set: that conflict is refused later)
            for r in own:
                if f"{r}.train.{keys[1]}" not in given:
                    raw[r]["train"][keys[1]] = new
        elif len(own) == 2 and any(v != new for v in own.values()):  # (one already equal: the other is missed)
            key = ".".join(keys)
            by_set = " with these --set overrides" if any(f"{r}.{key}" in given for r in own) else ""
            folder = " (a run folder's recipe is resolved)" if os.path.basename(source) == "recipe.yaml" else ""
            raise UserError(f"--set {key}: every model in {source}{by_set} sets its own {'.'.join(keys[1:])}"
                            f"{folder}, so train.* reaches none; set teacher.{key} and/or student.{key} instead")


def _at(node: Any, keys: List[str]) -> Any:
    """node[k0][k1]..., or None where a key is missing."""
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node


class RecipeLoader(yaml.SafeLoader):
    """safe_load, plus two guards against values that would silently differ from the text: a key given twice
    in one mapping is refused (PyYAML keeps the last, dropping the first section without a word), and only
    decimal integers are integers (YAML 1.1 reads `017` as 15 and `1:30` as 90; they stay text, and the
    schema names them)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # (`<<: *anchor` merges; its keys may be overridden)
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # (an unhashable key: the mapping's own construction says so)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (the later one would "
                                                        f"silently replace the first)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


RecipeLoader.yaml_implicit_resolvers = {  # (a copy: yaml.SafeLoader's own table is left as it is)
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                   list("-+0123456789"))
# Floats: decimals and exponents, 1e-4 too (YAML 1.1 wants a dot and a signed exponent: 1e-4 stayed text inside
# a model's args), not base 60 (1:30.0 read as 90.0).
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class RecipeDumper(yaml.SafeDumper):
    """YAML that RecipeLoader reads back as written, and other YAML readers too: a text that either's resolvers
    would read as something else (1e3, .5e2 for RecipeLoader; 017, 1:30 for YAML 1.1) is quoted."""


RecipeDumper.yaml_implicit_resolvers = {
    first: RecipeLoader.yaml_implicit_resolvers.get(first, []) + yaml.SafeLoader.yaml_implicit_resolvers.get(first, [])
    for first in {*RecipeLoader.yaml_implicit_resolvers, *yaml.SafeLoader.yaml_implicit_resolvers}}


def dump_yaml(data: Any, **kw: Any) -> str:
    return yaml.dump(data, Dumper=RecipeDumper, **kw)


# A recipe is a small tree: more values than this (aliases that repeat aliases: 1 KB of YAML can name 10**8
# of them) or deeper nesting is refused, before any code walks it
MAX_VALUES, MAX_DEPTH = 100_000, 64


def load_yaml(text: Any) -> Any:
    """A recipe's YAML (a file or a --set value) read as data: no tags that build objects, see RecipeLoader;
    each value its own (a value an alias repeats is copied: a --set of one place would change the other too)."""
    try:
        return _own_copy(yaml.load(text, Loader=RecipeLoader))
    except RecursionError:
        raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", None) from None


def _own_copy(tree: Any) -> Any:
    count = 0

    def copy(node: Any, above: frozenset) -> Any:
        nonlocal count
        if not isinstance(node, (dict, list)):
            return node
        count += 1
        if id(node) in above:
            raise yaml.composer.ComposerError(None, None, "an alias inside the value it names (&a {x: *a})", None)
        if count > MAX_VALUES or len(above) >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_VALUES:,} values, or nested more than "
                                              f"{MAX_DEPTH} levels deep (aliases that repeat aliases?)", None)
        inner = above | {id(node)}
        return {k: copy(v, inner) for k, v in node.items()} if isinstance(node, dict) else [copy(v, inner) for v in node]
    return copy(tree, frozenset())


def read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return load_yaml(fh)
    except yaml.constructor.ConstructorError as e:
        mark = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        tag = "constructor for the tag" in (e.problem or "")
        raise UserError(f"{path}{mark}: " + ("YAML tags such as !!python are not allowed in a recipe" if tag
                                             else e.problem)) from None
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


def bundled_recipe_path(name: str) -> str:
    return str(resources.files("distill.recipes") / f"{name}.yaml")


def resolve_recipe_path(path_or_name: str) -> str:
    """A file path, or the name of a bundled recipe (`distill recipes` lists them)."""
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name[:-5] if path_or_name.endswith(".yaml") else path_or_name
    if name in bundled_recipes():
        return bundled_recipe_path(name)
    raise UserError(f"{path_or_name}: no such recipe file or bundled recipe{did_you_mean(name, bundled_recipes())}; "
                    f"bundled: {', '.join(bundled_recipes())}")
