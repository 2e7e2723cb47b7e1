"""The model registry and build-time checks: shape errors name the layer, class counts must match."""
import pytest
import torch

from distill.errors import UserError
from distill.models import build_model, check_output, count_params
from distill.registry import MODELS


def test_registry_lists_the_named_architectures():
    assert set(MODELS.names()) >= {"mlp", "cnn", "seed_cnn_teacher", "seed_cnn_student", "resnet8x4",
                                   "resnet32x4", "wrn_16_2", "wrn_40_2"}


def test_seed_cnn_pair_sizes_and_shapes():
    t = build_model({"model": "seed_cnn_teacher"}, (3, 32, 32), 10)
    s = build_model({"model": "seed_cnn_student"}, (3, 32, 32), 10)
    convs = [m.out_channels for m in t.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [32, 64] and t.head.in_features == 512
    assert [m.out_channels for m in s.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 32]
    assert s.head.in_features == 256 and count_params(s) * 3 < count_params(t)
    assert s(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_layer_list_shape_error_names_the_layer():
    with pytest.raises(UserError, match=r"student\.arch\[1\]: Linear cannot take input of shape \(64,\)"):
        build_model({"arch": ["Flatten()", "Linear(100, 10)"]}, (1, 8, 8), 10, where="student")


def test_wrong_number_of_outputs():
    with pytest.raises(UserError, match=r"outputs shape \(5,\) per sample but the data has 10 classes"):
        build_model({"arch": ["Flatten()", "Linear(64, 5)"]}, (1, 8, 8), 10, where="teacher")


def test_registry_model_bad_args_and_unknown_name():
    with pytest.raises(UserError, match="teacher.args: .*unexpected keyword argument 'widht'"):
        build_model({"model": "mlp", "args": {"widht": 3}}, (4,), 2, where="teacher")
    with pytest.raises(UserError, match="unknown model 'resnet8x5' \\(did you mean 'resnet8x4'\\?\\)"):
        build_model({"model": "resnet8x5"}, (3, 32, 32), 10, where="teacher")
    model = build_model({"model": "cnn"}, (1, 8, 8), 10)
    with pytest.raises(UserError, match=r"teacher: the model cannot take input of shape \(1, 16, 16\)"):
        check_output(model, (1, 16, 16), 10, "teacher")


@pytest.mark.parametrize("spec, message", [
    ({"arch": ["MaxPool2d(2, return_indices=True)", "Flatten()", "Linear(16, 10)"]},
     "teacher.arch[0]: MaxPool2d gives a tuple, not a tensor"),
    ({"arch": ["Flatten()", "Linear(in_features=64, out_features=10, in_features=5)"]}, "gives in_features= twice"),
    ({"arch": ["Flatten(start_dim='a')", "Linear(64, 10)"]}, "teacher.arch[0]: Flatten cannot take input of shape"),
    ({"model": "wrn_16_2", "args": {"drop_rate": 2.0}}, "dropout probability has to be between 0 and 1"),
])
def test_layers_that_build_but_cannot_run_are_one_line(spec, message):
    """Each was a traceback (an error other than RuntimeError in the first forward pass, a tuple output)."""
    from distill.errors import UserError
    shape = (3, 32, 32) if "model" in spec else (1, 8, 8)
    with pytest.raises(UserError) as e:
        build_model(spec, shape, 10, "teacher")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_model_too_big_for_memory_is_refused_before_it_is_allocated():
    """The per-layer cap counted one layer's parameters: an mlp of several wide layers (or a layer list of
    many) was allocated until the machine swapped. The whole model is sized on the meta device first."""
    import time
    from distill.errors import UserError
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"teacher: 40,015,[0-9,]+ parameters .* needs about [0-9,]+ GiB of memory, "
                                        r"more than this machine's"):
        build_model({"model": "mlp", "args": {"hidden": [200000, 200000]}}, (64,), 10, "teacher")
    assert time.perf_counter() - t0 < 30  # (nothing allocated)


def test_an_in_place_layer_is_built_out_of_place():
    """In place, a first layer changed the stored data the teacher reads, for every model (the baseline's
    accuracy moved with the teacher's arch); out of place it computes the same."""
    for first in ("ReLU(inplace=True)", "ReLU(True)", "LeakyReLU(0.1, True)", "Dropout(0.5, True)"):
        model = build_model({"arch": [first, "Flatten()", "Linear(64, 10)"]}, (1, 8, 8), 10, "teacher")
        x = torch.randn(4, 1, 8, 8)
        before = x.clone()
        model(x)
        assert not model[0].inplace and torch.equal(x, before), first
    # and a feature hook on the layer before one given in place by position holds that layer's own output
    from distill.hooks import FeatureCapture
    model = build_model({"arch": ["Conv2d(1, 4, 3, padding=1)", "ReLU(True)", "Flatten()", "Linear(256, 10)"]},
                        (1, 8, 8), 10, "teacher").eval()
    with FeatureCapture(model, ["0"]) as cap:
        model(x)
    assert torch.equal(cap.outputs["0"], model[0](x)) and cap.outputs["0"].min() < 0
