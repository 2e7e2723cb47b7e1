"""The layer-spec parser: builds allow-listed layers from literals and rejects everything else."""
from __future__ import annotations

import builtins
import os
import subprocess

import pytest
import torch
from torch import nn

from distill.errors import UserError
from distill.models.layers import ALLOWED_LAYERS, build_layer_list, parse_layer

WHERE = "teacher.arch[2]"


def test_seed_examples_parse_to_the_right_layers():
    conv = parse_layer("Conv2d(3, 16, kernel_size=3, padding=1)")
    assert type(conv) is nn.Conv2d
    assert (conv.in_channels, conv.out_channels) == (3, 16)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    lin = parse_layer("Linear(2048, 256)")
    assert type(lin) is nn.Linear and (lin.in_features, lin.out_features) == (2048, 256)
    assert type(parse_layer("ReLU()")) is nn.ReLU
    assert parse_layer("MaxPool2d(2)").kernel_size == 2
    assert type(parse_layer("Flatten()")) is nn.Flatten


@pytest.mark.parametrize("spec, check", [
    ("LeakyReLU(-0.1)", lambda m: m.negative_slope == -0.1),
    ("Linear(4, 2, bias=False)", lambda m: m.bias is None),
    ("Conv2d(3, 8, (3, 5), padding='same')", lambda m: m.kernel_size == (3, 5) and m.padding == "same"),
    ("Unflatten(1, [16, 4, 4])", lambda m: tuple(m.unflattened_size) == (16, 4, 4)),
    ("LayerNorm((8,), eps=1e-6)", lambda m: m.normalized_shape == (8,) and m.eps == 1e-6),
    ("  Dropout(p=0.25)  ", lambda m: m.p == 0.25),
    ("AdaptiveAvgPool2d(None)", lambda m: m.output_size is None),
])
def test_literal_arguments_of_every_kind(spec, check):
    assert check(parse_layer(spec))


def test_layer_list_builds_a_runnable_sequential():
    model = build_layer_list(["Conv2d(3, 16, kernel_size=3, padding=1)", "ReLU()", "MaxPool2d(2)",
                              "Flatten()", "Linear(4096, 10)"], where="student.arch")
    assert isinstance(model, nn.Sequential) and len(model) == 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_allowed_layers_are_nn_module_classes():
    assert {"Linear", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "BatchNorm2d", "Embedding"} <= set(ALLOWED_LAYERS)
    for name, cls in ALLOWED_LAYERS.items():
        assert isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__name__ == name


REJECTED = {
    "__import__('os').system('echo hi')": "bare layer name",
    "os.system('x')": "attribute access",
    "nn.Linear(2,3)": "write 'Linear(...)'",
    "torch.nn.Linear(2, 3)": "write 'Linear(...)'",
    "Linear(int('3'), 2)": "a function call",
    "Linear([int('3')], 2)": "a function call",
    "(lambda: 1)()": "a lambda",
    "Linear(*[2, 3])": "*args",
    "Linear(**{'in_features': 2})": "**kwargs",
    "Linear(2, 3).weight": "single layer call",
    "Linear(x, 3)": "variable name",
    "Linear(2 * 3, 4)": "arithmetic",
    "Linear(2, 3, bias={'a': 1})": "a dict",
    "Linear([i for i in range(3)], 2)": "comprehension",
    "[Linear(2,3)]": "got a list",
    "Linear(2, 3); import os": "not valid layer syntax",
    "Linear(2, 3\n": "not valid layer syntax",
    "": "is empty",
    "eval('1')": "not an allowed layer",
    "exec('import os')": "not an allowed layer",
    "getattr(nn, 'Linear')(2, 3)": "bare layer name",
    "Linear(2, 3)[0]": "a subscript",
    "Conv3x(3, 4)": "did you mean 'Conv2d'?",
    "Sequential(Linear(2, 3))": "not an allowed layer",
    "Linear(2, 3, device='cuda')": "device=",
    "Linear(3)": "invalid arguments",
    "Linear(-1, 3)": "invalid arguments",
    "Linear(2.5, 3)": "invalid arguments",
    "Dropout(2)": "invalid arguments",
    "Linear(2, 3, foo=1)": "invalid arguments",
    "Linear(1000000, 1000000)": "parameters",
    "Linear(" + "1, " * 600 + ")": "too long",
}


@pytest.mark.parametrize("spec", list(REJECTED))
def test_rejections_are_one_line_user_errors_naming_where(spec):
    with pytest.raises(UserError) as info:
        parse_layer(spec, where=WHERE)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{WHERE}: ")
    assert REJECTED[spec] in msg
    if len(spec) < 60:
        assert repr(spec) in msg  # the spec is quoted


def test_unknown_layer_message_lists_the_allowed_ones():
    with pytest.raises(UserError, match=r"allowed: .*Conv2d.*Linear"):
        parse_layer("Conv3x(3, 4)", where=WHERE)


def test_bad_arguments_show_the_usage():
    with pytest.raises(UserError, match=r"usage: Linear\(in_features, out_features, bias=True\)"):
        parse_layer("Linear(3)", where=WHERE)


@pytest.mark.parametrize("spec", [5, None, b"Linear(2, 3)", ["Linear(2, 3)"], nn.Linear(2, 3)])
def test_non_string_spec_is_a_user_error(spec):
    with pytest.raises(UserError, match=r"^teacher\.arch\[2\]: a layer spec must be a string") as info:
        parse_layer(spec, where=WHERE)
    assert "\n" not in str(info.value)


def test_layer_list_names_the_index_of_the_bad_entry():
    with pytest.raises(UserError, match=r"^student\.arch\[1\]: 'Relu\(\)' .*did you mean 'ReLU'"):
        build_layer_list(["Flatten()", "Relu()", "Linear(4, 2)"], where="student.arch")


@pytest.mark.parametrize("specs", [[], (), "ReLU()", None, {"a": "ReLU()"}])
def test_layer_list_must_be_a_nonempty_list(specs):
    with pytest.raises(UserError, match=r"^student\.arch: ") as info:
        build_layer_list(specs, where="student.arch")
    assert "\n" not in str(info.value)


def _forbid_everything_dangerous(monkeypatch):
    """Make every way of running code from a spec blow up loudly (not as a UserError)."""
    def boom(*args, **kwargs):
        raise AssertionError(f"dangerous call during parsing: {args!r:.80}")
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name.split(".")[0] in {"os", "subprocess", "sys", "shutil", "socket", "importlib"}:
            boom(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(os, "system", boom)
    monkeypatch.setattr(os, "popen", boom)
    monkeypatch.setattr(subprocess, "Popen", boom)
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    monkeypatch.setattr(builtins, "__import__", guarded_import)


@pytest.mark.parametrize("spec", [s for s in REJECTED if "invalid arguments" not in REJECTED[s]
                                  and "parameters" not in REJECTED[s]])
def test_rejected_specs_never_run_anything(monkeypatch, spec):
    spies = []
    for name, cls in ALLOWED_LAYERS.items():  # no constructor at all may run for these specs
        monkeypatch.setitem(ALLOWED_LAYERS, name, lambda *a, _n=name, **k: spies.append(_n))
    _forbid_everything_dangerous(monkeypatch)
    with pytest.raises(UserError):
        parse_layer(spec, where=WHERE)
    assert spies == []


def test_only_the_named_allowed_constructor_is_called(monkeypatch):
    calls = []
    for name, cls in list(ALLOWED_LAYERS.items()):
        def spy(*args, _cls=cls, **kwargs):
            calls.append((_cls.__name__, args, kwargs))
            return _cls(*args, **kwargs)
        monkeypatch.setitem(ALLOWED_LAYERS, name, spy)
    _forbid_everything_dangerous(monkeypatch)
    layer = parse_layer("Linear(4, 2, bias=False)", where=WHERE)
    assert type(layer) is nn.Linear
    assert calls and all(c == ("Linear", (4, 2), {"bias": False}) for c in calls)


def test_random_text_gives_a_user_error_or_an_allowed_layer(monkeypatch):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    allowed_types = tuple(ALLOWED_LAYERS.values())
    names = st.sampled_from(sorted(ALLOWED_LAYERS) + ["os", "eval", "nn.Linear", "__import__", "Lin"])
    literal = st.one_of(st.integers(-3, 64), st.floats(-2, 2, allow_nan=False), st.booleans(),
                        st.none(), st.sampled_from(["'same'", "'mean'", "(2, 2)", "[1, 2]", "x", "f()"]))
    calls = st.builds(lambda n, a: f"{n}({', '.join(map(str, a))})", names, st.lists(literal, max_size=4))
    junk = st.text(alphabet="Linear()Conv2d0123456789,.-_=+*' []{}:;lambdx\n\\", max_size=40)

    @hypothesis.settings(max_examples=300, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.one_of(calls, junk))
    def check(spec):
        try:
            with monkeypatch.context() as patch:  # only around parsing: hypothesis itself uses exec
                _forbid_everything_dangerous(patch)
                layer = parse_layer(spec, where=WHERE)
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{WHERE}: ")
        else:
            assert isinstance(layer, allowed_types)

    check()


@pytest.mark.parametrize("spec, message", [
    ("Linear(4, 2, bias='false')", "gives bias='false'; write bias=True or bias=False"),
    ("BatchNorm2d(8, track_running_stats='False')",
     "gives track_running_stats='False'; write track_running_stats=True or track_running_stats=False"),
    ("Linear(4, 2, bias=false)", "writes false; write False (or 'false', if a string is meant)"),
    ("GELU(approximate=none)", "writes none; write None (or 'none', if a string is meant)"),
    ("Linear(True, 2)", "gives in_features=True, which is a number here; write the number"),
])
def test_a_switch_takes_true_or_false_and_a_size_no_bool(spec, message):
    """Following the hint to quote a bare false, bias='false' was a non-empty string, read as True: the bias was
    kept, silently; a bool was taken for a size."""
    with pytest.raises(UserError) as e:
        parse_layer(spec, WHERE)
    assert str(e.value) == f"{WHERE}: {spec!r} {message}"
    assert parse_layer("Linear(4, 2, bias=False)").bias is None and parse_layer("Dropout(0.5, True)").p == 0.5
    assert parse_layer("Linear(4, 2, bias=0)").bias is None and parse_layer("Conv2d(1, 2, 3, bias=None)").bias is None
