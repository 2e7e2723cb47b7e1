"""A recipe never executes code: fuzz the recipe loader and the layer parser, and check what gets built."""
import os

import pytest
import torch
import yaml
from torch import nn

from distill.errors import UserError
from distill.models.layers import ALLOWED_LAYERS, build_layer_list
from distill.recipe import SCHEMA, Recipe, read_yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = sorted({k for sec in SCHEMA.values() if isinstance(sec, dict) for k in sec} | set(SCHEMA) |
              {"__import__", "eval", "!!python", "os.system", "lambda"})
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["__import__('os').system('touch PWNED')", "lambda: 1",
                                                           "Linear(2, 3)", "../../etc/passwd", "mlp", "digits"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=20)
RECIPES = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8)


@pytest.fixture(autouse=True)
def no_code_runs(monkeypatch, tmp_path):
    """Anything that tries to run a command fails the test loudly."""
    def forbidden(*a, **k):
        raise AssertionError(f"code was executed: {a}")
    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(os, "popen", forbidden)
    monkeypatch.chdir(tmp_path)


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(RECIPES)
def test_random_recipes_validate_or_give_a_user_error(raw):
    try:
        Recipe.from_dict(raw)
    except UserError as e:
        assert "\n" not in str(e)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200))
def test_random_yaml_text_is_read_safely(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        Recipe.from_dict(read_yaml(str(path)))
    except UserError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch PWNED']", "!!python/name:os.system",
                                 "!!python/module:os", "!!python/object/new:subprocess.Popen [['id']]",
                                 "!!binary aGk=", "!<tag:yaml.org,2002:python/object/apply:os.system> [id]"])
def test_yaml_code_tags_are_refused(tmp_path, tag):
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: {{model: mlp}}\nstudent: {{model: mlp}}\nname: {tag}\n")
    with pytest.raises(UserError):
        Recipe.load(str(path))
    assert not (tmp_path / "PWNED").exists()


SPECS = st.one_of(st.text(max_size=60), st.builds(lambda n, a: f"{n}({a})", st.sampled_from(
    list(ALLOWED_LAYERS) + ["__import__", "eval", "exec", "getattr", "open", "os.system", "nn.Linear", "Sequential",
                            "MultiheadAttention", "Module"]), st.text(max_size=30)))


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(SPECS, min_size=1, max_size=3))
def test_layer_lists_build_only_allowed_layers(monkeypatch, specs):
    built = []
    original = nn.Module.__init__

    def record(self, *a, **k):
        built.append(type(self))
        original(self, *a, **k)
    monkeypatch.setattr(nn.Module, "__init__", record)
    try:
        build_layer_list(specs, where="student.arch")
    except UserError as e:
        assert "\n" not in str(e)
    finally:
        monkeypatch.setattr(nn.Module, "__init__", original)
    assert set(built) <= set(ALLOWED_LAYERS.values()) | {nn.Sequential}


def test_yaml_safe_loader_is_what_reads_recipes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("a: !!python/object/apply:os.system ['id']\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(path.read_text())  # the loader read_yaml uses refuses python tags
    with pytest.raises(UserError, match="YAML tags such as !!python are not allowed"):
        read_yaml(str(path))


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", ".hidden", "a\\b", "x" * 101, ""])
def test_run_names_cannot_escape_the_runs_folder(name):
    with pytest.raises(UserError, match="name: "):
        Recipe.from_dict({"name": name, "teacher": {"model": "mlp"}, "student": {"model": "mlp"}})


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_that_exists_only_as_its_own_code_is_refused_and_the_code_never_runs(tmp_path, where):
    """transformers asks on the terminal whether to run a folder's code (auto_map), and a 'y' on stdin ran it.
    distill passes trust_remote_code=False, and refuses in one line a folder whose model or tokenizer type only
    its own code defines, for every kind of model it loads; a shipped type that still names its old code (hub
    snapshots of Phi) is not refused, and loads as transformers' own class."""
    import json
    from distill.models.hf import load_classifier, load_tokenizer, refuse_remote_code
    from distill.models.hf_lm import load_causal_lm
    from distill.pipeline.artifacts import load_model_at
    folder = tmp_path / "evil"
    folder.mkdir()
    ran = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    code = {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **code}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **code}))
    refuse_remote_code(str(folder), "teacher.hf")  # (shipped types: nothing of the folder's is run)
    kind = {"config.json": ("model_type", "evilbert"), "tokenizer_config.json": ("tokenizer_class", "EvilTokenizer")}
    cfg = json.loads((folder / where).read_text())
    (folder / where).write_text(json.dumps({**cfg, kind[where][0]: kind[where][1]}))
    for load in (lambda: load_tokenizer(str(folder), "data.tokenizer"), lambda: load_causal_lm(str(folder), "teacher.hf"),
                 lambda: load_classifier(str(folder), ["a", "b"], "teacher.hf"), lambda: load_model_at(str(folder), "x")):
        with pytest.raises(UserError, match=f"{where}: its {kind[where][0]} '{kind[where][1]}' exists only as code in "
                                            f"the folder .*distill never runs code"):
            load()
    assert not ran.exists()


class _Runs:  # (a pickle that would run code as it loads)
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_model_folder_whose_pickled_weights_hold_code_is_one_line_and_the_code_never_runs(tmp_path):
    """transformers loads a pytorch_model.bin with weights_only=True, which refuses it: the refusal came out
    as a traceback, exit 1."""
    import transformers
    from distill.models.hf import load_classifier
    from distill.models.hf_lm import load_causal_lm
    from distill.pipeline.artifacts import load_model_at
    ran = tmp_path / "ran"
    for name, config in (("bert", transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16)),
                         ("llama", transformers.LlamaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                            num_attention_heads=2, intermediate_size=16))):
        folder = tmp_path / name
        config.save_pretrained(folder)
        torch.save({"w": _Runs(str(ran))}, folder / "pytorch_model.bin")
        loads = [lambda: load_causal_lm(str(folder), "teacher.hf")] if name == "llama" else \
            [lambda: load_classifier(str(folder), ["a", "b"], "teacher.hf"), lambda: load_model_at(str(folder), "x")]
        for load in loads:
            with pytest.raises(UserError, match=r"(teacher.hf|x): .*: cannot load .*Weights only load failed"):
                load()
    assert not ran.exists()


@pytest.mark.parametrize("meta, message", [
    ([1, 2], "the distill metadata in the header is list, not a mapping"),
    ({"spec": "abc"}, "the header's spec is 'abc', not a dict"),
    ({"input_shape": [-1, 8, 8]}, "the header's input_shape [-1, 8, 8] is not a list of positive sizes"),
    ({"num_classes": "10"}, "the header's num_classes is '10', not an int"),
    # (fields inside the header's: each a TypeError, or 720 GB asked of the allocator, where the code read them)
    ({"spec": {"model": ["mlp"]}}, "the header's spec.model is ['mlp'], not what distill writes"),
    ({"spec": {"model": "mlp", "args": 5}}, "the header's spec.args is 5, not what distill writes"),
    ({"preprocessing": {"normalize": 5}}, "the header's preprocessing.normalize is 5, not what distill writes"),
    ({"preprocessing": {"normalize": {"mean": [0.1], "std": [1, 2]}}}, "the header's preprocessing.normalize is"),
    ({"structure": 5}, "the header's structure is 5, not what distill writes"),
    ({"spec": {"model": "wrn_16_2"}, "input_shape": [3, 2600, 2600]},  # (5.4 GB for its check, and on)
     "input_shape [3, 2600, 2600] is over 16,777,216 values an input"),
])
def test_a_model_file_with_a_malformed_header_is_one_line(tmp_path, meta, message):
    """A file written elsewhere or edited: each was an AttributeError or TypeError deep in the loading code."""
    import json
    import torch
    from safetensors.torch import save_file
    from distill.io import load_meta
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.zeros(1)}, path, metadata={"distill": json.dumps(meta)})
    with pytest.raises(UserError) as e:
        load_meta(path)
    assert message in str(e.value), str(e.value)
