"""CIFAR ResNets / WRNs of the CRD benchmark: sizes match the papers, shapes, hookable names."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from distill.errors import UserError
from distill.models import cifar  # noqa: F401  (registers the models)
from distill.registry import MODELS

# Parameter counts reported for CIFAR-100 (Tian et al., CRD, and the RepDistiller code).
REFERENCE_PARAMS = {"resnet8x4": 1.23e6, "resnet32x4": 7.43e6, "wrn_16_2": 0.70e6, "wrn_40_2": 2.26e6}
NAMES = list(REFERENCE_PARAMS)


def build(name, input_shape=(3, 32, 32), num_classes=100, **kwargs):
    torch.manual_seed(0)
    return MODELS.get(name)(input_shape, num_classes, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_registered(name):
    assert name in MODELS


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_the_reference(name):
    n = sum(p.numel() for p in build(name).parameters())
    assert abs(n - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.01, n


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_cifar_and_one_channel_mnist(name):
    model = build(name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    mnist = build(name, (1, 28, 28), 10)
    assert mnist.conv1.in_channels == 1
    assert mnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name, names", [
    ("resnet8x4", ["conv1", "bn1", "layer1", "layer2", "layer3", "avgpool", "fc", "layer1.0.downsample"]),
    ("resnet32x4", ["conv1", "bn1", "layer1", "layer2", "layer3", "layer3.4.bn2", "avgpool", "fc"]),
    ("wrn_16_2", ["conv1", "block1", "block2", "block3", "block3.0.convShortcut", "bn", "relu", "avgpool", "fc"]),
    ("wrn_40_2", ["conv1", "block1", "block2", "block3", "block1.5.conv2", "bn", "relu", "avgpool", "fc"]),
])
def test_hookable_module_names(name, names):
    modules = dict(build(name).named_modules())
    assert set(names) <= set(modules)
    assert isinstance(modules["fc"], nn.Linear) and modules["fc"].out_features == 100


@pytest.mark.parametrize("name, stages, channels, sizes", [
    ("resnet8x4", ["layer1", "layer2", "layer3"], [64, 128, 256], [32, 16, 8]),
    ("wrn_40_2", ["block1", "block2", "block3", "relu"], [32, 64, 128, 128], [32, 16, 8, 8]),
])
def test_stage_feature_shapes_via_hooks(name, stages, channels, sizes):
    model, feats = build(name), {}
    modules = dict(model.named_modules())
    for stage in stages:
        modules[stage].register_forward_hook(lambda m, i, o, s=stage: feats.__setitem__(s, o))
    model(torch.randn(2, 3, 32, 32))
    for stage, c, s in zip(stages, channels, sizes):
        assert feats[stage].shape == (2, c, s, s)


@pytest.mark.parametrize("name, hooked", [("resnet8x4", "layer1.0.bn2"), ("resnet32x4", "bn1"),
                                          ("wrn_16_2", "block1.0.bn2"), ("wrn_40_2", "bn")])
def test_hooked_outputs_are_not_overwritten_in_place(name, hooked):
    """A BN output hooked for feature distillation must keep its negative values (no in-place ReLU/add)."""
    model, seen = build(name).eval(), {}
    module = dict(model.named_modules())[hooked]
    module.register_forward_hook(lambda m, i, o: seen.update(out=o, copy=o.detach().clone()))
    model(torch.randn(2, 3, 32, 32))
    assert (seen["copy"] < 0).any()
    assert torch.equal(seen["out"], seen["copy"])


@pytest.mark.parametrize("name", NAMES)
def test_initialisation(name):
    model = build(name)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Conv2d):  # kaiming normal, fan_out: std = sqrt(2 / (k*k*out))
            std = (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5
            if m.weight.numel() > 5000:
                assert abs(m.weight.std().item() / std - 1) < 0.1


def test_resnet_state_dict_keys_match_the_reference_layout():
    keys = set(build("resnet8x4").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.weight", "layer3.0.bn2.num_batches_tracked", "fc.weight", "fc.bias"} <= keys


def test_wrn_loads_a_reference_style_checkpoint():
    """RepDistiller names WRN stages `blockK.layer.i` and the final BN `bn1`; those keys are renamed on load."""
    source, target = build("wrn_16_2"), build("wrn_16_2")
    torch.nn.init.normal_(source.bn.weight)
    ours = source.state_dict()
    reference = {re.sub(r"^(block\d)\.", r"\1.layer.", re.sub(r"^bn\.", "bn1.", k)): v for k, v in ours.items()}
    assert "block1.layer.0.conv1.weight" in reference and "bn1.weight" in reference
    target.load_state_dict(reference)  # strict
    assert "bn1.weight" in reference  # the caller's dict is not modified
    for k, v in target.state_dict().items():
        assert torch.equal(v, ours[k]), k
    target.load_state_dict(ours)  # our own layout still loads


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keyword_is_a_type_error(name):
    with pytest.raises(TypeError):
        build(name, bogus=1)


@pytest.mark.parametrize("name", NAMES)
def test_non_image_input_shape_is_a_user_error(name):
    with pytest.raises(UserError, match=name):
        build(name, input_shape=(784,))
