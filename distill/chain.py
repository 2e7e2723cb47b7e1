"""Teacher-assistant chains (Mirzadeh et al. 2020): teacher -> assistant_1 -> ... -> student.

When the teacher is much larger than the student, a model of intermediate size can bridge the gap: each
assistant is distilled from the generation before it, with the student's distillation settings and training
budget (`student.train`), and the student then learns from the last assistant. `distill.assistants: auto`
makes one assistant of intermediate size: every width (and depth) of the two models, interpolated
geometrically. After evaluation, `chain.json` records every generation's accuracy and its retention (linear
CKA of its logits against the ORIGINAL teacher's on the validation probe), and the decay from one generation
to the next, so one can see where knowledge is lost along the chain.
"""
from __future__ import annotations

import ast
import inspect
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import UserError
from .io import write_json
from .models import PRESETS, build_model, count_params
from .models.layers import parse_layer
from .engine.inference import predict
from .engine.trainer import set_seed
from .monitor import linear_cka
from .pipeline.artifacts import model_spec
from .pipeline.rundir import RunDir
from .registry import MODELS
from .roles import STUDENT, TEACHER, assistant_names

PROBE = 256  # validation samples on which retention is measured (as the monitor does)
EXPLICIT = "list the assistant explicitly, e.g. distill.assistants: [{model: cnn, args: {...}}]"


names = assistant_names  # (`assistant_1`, ... for the recipe's chain)


def specs(run: RunDir) -> List[Dict[str, Any]]:
    """The architecture of each assistant: as listed, or interpolated between teacher and student (`auto`)."""
    a = run.cfg["distill"].get("assistants") or []
    if a == "auto":
        return [interpolate(model_spec(run, TEACHER), model_spec(run, STUDENT), run.data.input_shape)]
    return [{"model": m["model"], "args": m["args"], "arch": m["arch"]} for m in a]


def build(run: RunDir, i: int, spec: Dict[str, Any]) -> nn.Module:
    set_seed(run.cfg["student"]["train"]["seed"])  # the students' seed: a rerun starts from the same init
    return build_model(spec, run.data.input_shape, run.data.num_classes, where=f"distill.assistants[{i}]")


def check_sizes(run: RunDir, assistants: List[nn.Module], teacher: nn.Module, student: nn.Module) -> None:
    """An `auto` assistant must lie between the student and the teacher in size; explicit ones that do not
    shrink from the teacher to the student are said (a chain is meant to bridge a gap, step by step)."""
    if run.cfg["distill"]["assistants"] != "auto":
        sizes = [count_params(m) for m in (teacher, *assistants, student)]
        if assistants and any(a <= b for a, b in zip(sizes, sizes[1:])) and run.runtime.is_main:  # (preflight:
            run.echo(f"warning: distill.assistants: the chain's sizes are "  # nothing is written)
                     f"{' -> '.join(f'{n:,}' for n in sizes)} parameters (teacher to student), not each smaller "
                     f"than the one before it")
        return
    n, lo, hi = count_params(assistants[0]), count_params(student), count_params(teacher)
    if not lo < n < hi:
        raise UserError(f"distill.assistants: auto gives an assistant of {n:,} parameters, not between the "
                        f"student's {lo:,} and the teacher's {hi:,}; {EXPLICIT}")


# ---------------------------------------------------------------- decay per generation

def report(run: RunDir, metrics: Dict[str, Any], models: Dict[str, nn.Module]) -> Optional[Dict[str, Any]]:
    """chain.json: each generation (teacher, assistants, distilled student; `models`, as evaluated) and the
    decay between neighbours. Retention is linear CKA of the logits against the original teacher's on the
    first 256 validation samples."""
    path = run.path("chain.json")
    gens = [TEACHER, *names(run.cfg), STUDENT]
    if len(gens) == 2:
        if os.path.exists(path):  # a chain from an earlier recipe in this folder no longer describes it
            os.remove(path)
        return None
    probe, bs = run.data.probe(PROBE)[0], run.cfg["data"]["eval_batch_size"]
    t_logits = predict(models["teacher"], probe, bs)
    rows = []
    for g in gens:
        m = metrics[g]
        cka = 1.0 if g == "teacher" else linear_cka(t_logits, predict(models[g], probe, bs))
        # (the decay is in test accuracy, measured here when evaluate.metrics leaves it out)
        acc = m["accuracy"] if "accuracy" in m else \
            float((predict(models[g], run.data.x_test, bs).argmax(1) == run.data.y_test).double().mean())
        rows.append({"name": g, "params": m["params"], "val_accuracy": m.get("val_accuracy"),
                     "test_accuracy": acc, "retention_cka": round(cka, 6)})
        run.event(f"chain: {g}: {m['params']:,} params, test accuracy {acc:.4f}, retention CKA vs "
                  f"the teacher {cka:.4f}", model=g, chain_generation=len(rows) - 1, test_accuracy=acc,
                  retention_cka=round(cka, 6))
    decay = [{"from": a["name"], "to": b["name"],
              "accuracy_drop": round((a["test_accuracy"] - b["test_accuracy"]) * 100, 4),  # points
              "decay_rate": round((a["test_accuracy"] - b["test_accuracy"]) / a["test_accuracy"], 6)
              if a["test_accuracy"] else None,
              "retention_drop": round(a["retention_cka"] - b["retention_cka"], 6)} for a, b in zip(rows, rows[1:])]
    out = {"generations": rows, "decay": decay}
    write_json(path, out)
    return out


# ---------------------------------------------------------------- auto: an assistant of intermediate size

def geometric(t: Any, s: Any, key: str) -> Any:
    """A number between the teacher's `t` and the student's `s` (whole numbers stay whole)."""
    if t == s:
        return t
    if isinstance(t, bool) or isinstance(s, bool) or not isinstance(t, (int, float)) \
            or not isinstance(s, (int, float)):
        raise UserError(f"distill.assistants: auto cannot interpolate {key}: {t!r} (teacher) vs {s!r} "
                        f"(student); {EXPLICIT}")
    v = math.sqrt(t * s) if t > 0 and s > 0 else (t + s) / 2
    return max(1, round(v)) if isinstance(t, int) and isinstance(s, int) else v


def mix(t: Any, s: Any, key: str) -> Any:
    """Interpolate an argument: numbers geometrically; lists element by element, their length (a depth)
    geometrically too, each list resampled to it at evenly spaced positions."""
    if isinstance(t, (list, tuple)) and isinstance(s, (list, tuple)) and t and s:
        n = geometric(len(t), len(s), f"{key} (length)")
        pick = lambda a: [a[round(j * (len(a) - 1) / (n - 1)) if n > 1 else 0] for j in range(n)]  # noqa: E731
        return [geometric(a, b, f"{key}[{j}]") for j, (a, b) in enumerate(zip(pick(t), pick(s)))]
    return geometric(t, s, key)


def _family(spec: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """A registry spec as (family, args): presets such as seed_cnn_teacher are one setting of `cnn`."""
    name, args = spec["model"], dict(spec.get("args") or {})
    if name in PRESETS:
        family, preset = PRESETS[name]
        return family, {**preset, **args}
    return name, args


def _defaults(name: str) -> Dict[str, Any]:
    params = inspect.signature(MODELS.get(name, where="distill.assistants")).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


def interpolate(t_spec: Dict[str, Any], s_spec: Dict[str, Any], input_shape: Sequence[int]) -> Dict[str, Any]:
    """The `auto` assistant: registry models of one family (each argument interpolated) or layer lists of
    one length and layer kinds (each layer's width interpolated); anything else is refused."""
    if t_spec.get("model") and s_spec.get("model"):
        (tf, ta), (sf, sa) = _family(t_spec), _family(s_spec)
        if tf != sf:
            raise UserError(f"distill.assistants: auto needs teacher and student of one model family, got {tf} "
                            f"and {sf}; {EXPLICIT}")
        d = _defaults(tf)
        args = {k: mix(ta.get(k, d.get(k)), sa.get(k, d.get(k)), f"{k}") for k in sorted({*ta, *sa})}
        return {"model": tf, "args": args, "arch": None}
    if t_spec.get("arch") and s_spec.get("arch"):
        return {"model": None, "args": {}, "arch": interpolate_arch(t_spec["arch"], s_spec["arch"], input_shape)}
    raise UserError(f"distill.assistants: auto needs teacher and student both given as `model` (one family) "
                    f"or both as `arch` layer lists; {EXPLICIT}")


# For layer lists: which argument is a layer's width (interpolated) and which its input size (set from the
# previous layer's output, so the list stays consistent after rounding). (name, position) pairs.
WIDTH = {"Linear": ("out_features", 1), "Conv1d": ("out_channels", 1), "Conv2d": ("out_channels", 1),
         "ConvTranspose2d": ("out_channels", 1)}
INPUT = {"Linear": ("in_features", 0, -1), "Conv1d": ("in_channels", 0, 1), "Conv2d": ("in_channels", 0, 1),
         "ConvTranspose2d": ("in_channels", 0, 1), "BatchNorm1d": ("num_features", 0, 1),
         "BatchNorm2d": ("num_features", 0, 1), "LayerNorm": ("normalized_shape", 0, -1)}


def _parse(spec: str) -> Tuple[str, List[Any], Dict[str, Any]]:
    """(layer name, positional args, keyword args) of a layer spec the recipe already validated."""
    call = ast.parse(spec.strip(), mode="eval").body
    return call.func.id, [ast.literal_eval(a) for a in call.args], \
        {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def _arg(args: List[Any], kwargs: Dict[str, Any], name: str, pos: int) -> Any:
    return kwargs[name] if name in kwargs else args[pos] if pos < len(args) else None


def _set(args: List[Any], kwargs: Dict[str, Any], name: str, pos: int, value: Any) -> None:
    if name in kwargs or pos >= len(args):
        kwargs[name] = value
    else:
        args[pos] = value


def interpolate_arch(t_arch: Sequence[str], s_arch: Sequence[str], input_shape: Sequence[int]) -> List[str]:
    if len(t_arch) != len(s_arch):
        raise UserError(f"distill.assistants: auto needs layer lists of one length, got {len(t_arch)} (teacher) "
                        f"and {len(s_arch)} (student) layers; {EXPLICIT}")
    x, out = torch.zeros(2, *input_shape), []
    for i, (ts, ss) in enumerate(zip(t_arch, s_arch)):
        (tn, targs, tkw), (sn, sargs, skw) = _parse(ts), _parse(ss)
        where = f"layer {i} ({ts!r} vs {ss!r})"
        if tn != sn:
            raise UserError(f"distill.assistants: auto needs the same layer kinds at each position, {where}; "
                            f"{EXPLICIT}")
        args, kwargs = list(sargs), dict(skw)
        if tn in WIDTH:
            name, pos = WIDTH[tn]
            _set(args, kwargs, name, pos, geometric(_arg(targs, tkw, name, pos), _arg(sargs, skw, name, pos), where))
        if tn in INPUT:
            name, pos, dim = INPUT[tn]
            given = _arg(targs, tkw, name, pos)  # (a LayerNorm over several trailing dimensions keeps them all)
            _set(args, kwargs, name, pos, list(x.shape[-len(given):]) if isinstance(given, (list, tuple))
                 else int(x.shape[dim]))
        # every other argument (kernel size, padding, ...) must agree, else the two are not one family
        for name in {*tkw, *skw} - {WIDTH.get(tn, ("",))[0], INPUT.get(tn, ("",))[0]}:
            if tkw.get(name) != skw.get(name):
                raise UserError(f"distill.assistants: auto cannot interpolate {name} of {where}; {EXPLICIT}")
        skip = {WIDTH.get(tn, ("", -1))[1], INPUT.get(tn, ("", -1))[1]}
        if len(targs) != len(sargs) or any(a != b for j, (a, b) in enumerate(zip(targs, sargs)) if j not in skip):
            raise UserError(f"distill.assistants: auto cannot interpolate {where}; {EXPLICIT}")
        spec = f"{tn}({', '.join([repr(a) for a in args] + [f'{k}={v!r}' for k, v in kwargs.items()])})"
        with torch.no_grad():
            x = parse_layer(spec, f"distill.assistants[0].arch[{i}]")(x)
        out.append(spec)
    return out
