"""Safe parsing of layer specs such as ``"Conv2d(3, 16, kernel_size=3, padding=1)"``.

Recipes are data, not code: a recipe downloaded from somewhere must never be able to run
anything on the machine that trains it. So a spec is parsed with :func:`ast.parse` and
checked node by node -- it must be exactly one call of a bare name from :data:`ALLOWED_LAYERS`
whose arguments are all literals (numbers, strings, bools, ``None``, tuples/lists of those).
Nothing from the spec is ever passed to ``eval``/``exec``/``getattr``/``import``; the only
thing called is the constructor of an allow-listed ``torch.nn`` class, looked up in a dict.
Every rejection is a one-line :class:`~distill.errors.UserError` naming where the spec came from.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Callable, Dict, List, NoReturn, Sequence

import torch
from torch import nn

from ..errors import UserError, did_you_mean

ALLOWED_LAYERS: Dict[str, type] = {cls.__name__: cls for cls in (
    nn.Linear, nn.Bilinear, nn.Embedding,
    nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.PReLU,
    nn.ELU, nn.Softplus, nn.Hardswish, nn.Mish,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity,
)}


class ArgError(ValueError):
    """A registered model's argument out of range; build_model names the recipe key it came from."""


def whole(name: str, value: Any, least: int = 1) -> None:
    """A size argument (or list of them, one per layer) must be whole numbers >= `least`."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values):
        raise ArgError(f"{name} must be {'whole numbers' if values is value else 'a whole number'} >= {least}, "
                       f"got {value!r}")


MAX_SPEC_CHARS = 1000
# One layer may hold at most this many parameters (2 GiB of float32): a typo such as
# Linear(1000000, 1000000) is a clear error instead of the machine running out of memory.
MAX_LAYER_PARAMS = 500_000_000
_FORBIDDEN_KWARGS = {"device": "the trainer places the model on its device",
                     "dtype": "the trainer chooses the dtype"}
_WHAT = {ast.Call: "a function call", ast.Name: "a variable name; quote strings, e.g. 'mean'",
         ast.Attribute: "attribute access", ast.Subscript: "a subscript", ast.Lambda: "a lambda",
         ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
         ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension",
         ast.BinOp: "arithmetic (write the number itself)", ast.Starred: "*args",
         ast.List: "a list", ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set",
         ast.Constant: "a constant", ast.UnaryOp: "an expression", ast.Not: "an expression",
         ast.Invert: "an expression",
         ast.JoinedStr: "an f-string", ast.NamedExpr: "an assignment expression"}
_NOT_LITERAL = ("has a non-literal argument ({}); only literal arguments are allowed: "
                "numbers, strings, True/False/None and tuples/lists of them")
_LITERAL_NODES = (ast.Constant, ast.Tuple, ast.List, ast.UnaryOp, ast.USub, ast.UAdd, ast.Load)


_PYTHON_WORDS = {"true": "True", "false": "False", "none": "None", "null": "None"}


def _check_kinds(cls: type, args: List[Any], kwargs: Dict[str, Any], fail: Callable[[str], NoReturn]) -> None:
    """A switch takes True or False, and a size no bool: bias='false' is a non-empty string, which a layer reads
    as True (the bias kept, silently), and Linear(True, 2) a layer of one input."""
    try:
        signature = inspect.signature(cls)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return  # (the constructor says what is wrong below)
    for name, value in bound.items():
        default = signature.parameters[name].default  # (`empty` for a size given by position: no bool either)
        if isinstance(default, bool) and isinstance(value, str):  # (0, 1 and None are read as they mean)
            fail(f"gives {name}={value!r}; write {name}=True or {name}=False")
        if isinstance(value, bool) and not isinstance(default, bool) and default is not None:
            fail(f"gives {name}={value!r}, which is a number here; write the number")


def _what(node: ast.AST) -> str:
    return _WHAT.get(type(node), f"a {type(node).__name__} expression")


def _suggest(name: str) -> str:
    by_lower = {k.lower(): k for k in ALLOWED_LAYERS}  # 'Relu' -> 'ReLU', 'linear' -> 'Linear'
    if name.lower() in by_lower:
        return f" (did you mean '{by_lower[name.lower()]}'?)"
    return did_you_mean(name, ALLOWED_LAYERS)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _quote(spec: str) -> str:
    text = repr(spec)
    return text if len(text) <= 80 else text[:76] + "..." + text[0]


def _signature(cls: type) -> str:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - every allowed class has one
        return f"{cls.__name__}(...)"
    shown = [p.name if p.default is p.empty else f"{p.name}={p.default!r}"
             for p in params if p.name not in _FORBIDDEN_KWARGS and not p.name.startswith("_")
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return f"{cls.__name__}({', '.join(shown)})"


def _literal(node: ast.AST, fail: Callable[[str], NoReturn]) -> Any:
    bad = next((n for n in ast.walk(node) if not isinstance(n, _LITERAL_NODES)), None)
    if isinstance(bad, ast.Name) and bad.id.lower() in _PYTHON_WORDS:  # (YAML's spelling, in a Python call)
        fail(f"writes {bad.id}; write {_PYTHON_WORDS[bad.id.lower()]} (or '{bad.id}', if a string is meant)")
    if bad is not None:
        fail(_NOT_LITERAL.format(_what(bad)))
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        fail(_NOT_LITERAL.format(_what(node)))


def parse_layer(spec: str, where: str = "") -> nn.Module:
    """Build one allow-listed ``torch.nn`` layer from a string like ``"Linear(256, 10)"``."""
    at = f"{where}: " if where else ""

    def fail(why: str) -> NoReturn:
        raise UserError(f"{at}{_quote(spec)} {_one_line(why)}")

    if not isinstance(spec, str):
        raise UserError(_one_line(f"{at}a layer spec must be a string like 'Linear(256, 10)', "
                                  f"got {type(spec).__name__} {spec!r:.60}"))
    if not spec.strip():
        fail("is empty; write a layer like 'Linear(256, 10)'")
    if len(spec) > MAX_SPEC_CHARS:
        fail(f"is too long ({len(spec)} characters, at most {MAX_SPEC_CHARS})")
    try:
        body = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        fail(f"is not valid layer syntax ({e.msg}); write it like 'Linear(256, 10)'")
    except (ValueError, RecursionError, MemoryError) as e:
        fail(f"is not valid layer syntax ({type(e).__name__}); write it like 'Linear(256, 10)'")

    if not isinstance(body, ast.Call):
        fail(f"must be a single layer call like 'Linear(256, 10)', got {_what(body)}")
    func = body.func
    if isinstance(func, ast.Attribute) and func.attr in ALLOWED_LAYERS:
        fail(f"must use the bare layer name: write '{func.attr}(...)', not a dotted path")
    if not isinstance(func, ast.Name):
        fail(f"must call a bare layer name from the allow-list, got {_what(func)}; "
             f"allowed: {', '.join(sorted(ALLOWED_LAYERS))}")
    cls = ALLOWED_LAYERS.get(func.id)
    if cls is None:
        fail(f"is not an allowed layer{_suggest(func.id)}; allowed: {', '.join(sorted(ALLOWED_LAYERS))}")

    args: List[Any] = []
    for node in body.args:
        if isinstance(node, ast.Starred):
            fail("may not use *args; write the arguments out")
        args.append(_literal(node, fail))
    kwargs: Dict[str, Any] = {}
    for kw in body.keywords:
        if kw.arg is None:
            fail("may not use **kwargs; write name=value arguments")
        if kw.arg in kwargs:  # (Python refuses it; the last one would silently win)
            fail(f"gives {kw.arg}= twice")
        if kw.arg in _FORBIDDEN_KWARGS:
            fail(f"may not set {kw.arg}= ({_FORBIDDEN_KWARGS[kw.arg]})")
        kwargs[kw.arg] = _literal(kw.value, fail)
    # (in place, a first layer would change the stored data the teacher reads, for every model, and a feature
    # hook on the layer before would hold the output after it: built out of place, which computes the same;
    # given by position, it is turned off on the built layer below)
    kwargs.pop("inplace", None)
    _check_kinds(cls, args, kwargs, fail)

    usage = f"usage: {_signature(cls)}"
    try:
        with torch.device("meta"):  # validate arguments and size without allocating memory
            probe = cls(*args, **kwargs)
        n_params = sum(p.numel() for p in probe.parameters())
        if n_params > MAX_LAYER_PARAMS:
            fail(f"would have {n_params:,} parameters (at most {MAX_LAYER_PARAMS:,} per layer); "
                 "check the sizes")
        layer = cls(*args, **kwargs)
        if getattr(layer, "inplace", False):  # (given by position: ReLU(True), Dropout(0.5, True))
            layer.inplace = False
        return layer
    except UserError:
        raise
    except Exception as e:  # TypeError/ValueError/RuntimeError from the constructor
        lines = str(e).strip().splitlines() or [type(e).__name__]
        fail(f"has invalid arguments: {lines[0]}; {usage}")


def build_layer_list(specs: Sequence[str], where: str = "") -> nn.Sequential:
    """Parse a recipe's list of layer specs into an ``nn.Sequential`` (named ``0``, ``1``, ...)."""
    at = f"{where}: " if where else ""
    if isinstance(specs, (str, bytes)) or not isinstance(specs, (list, tuple)):
        raise UserError(f"{at}expected a list of layer specs like ['Flatten()', 'Linear(784, 10)'], "
                        f"got {type(specs).__name__}")
    if not specs:
        raise UserError(f"{at}the layer list is empty; give at least one layer, e.g. ['Linear(784, 10)']")
    return nn.Sequential(*(parse_layer(s, f"{where}[{i}]") for i, s in enumerate(specs)))
