"""Dynamic int8 really stores int8 Linear weights and keeps the outputs close; fp16/bf16 casts the weights."""
import pytest
import torch
from torch import nn

from distill.compress.quantize import cast_weights, dynamic_int8, int8_linear_count
from distill.errors import UserError
from distill.models import build_model


def test_dynamic_int8_linear_layers_are_int8_and_outputs_stay_close():
    torch.manual_seed(0)
    model = build_model({"model": "mlp", "args": {"hidden": [256, 128]}}, (64,), 10).eval()
    q = dynamic_int8(model)
    assert int8_linear_count(q) == 3 and int8_linear_count(model) == 0
    assert not any(type(m) is nn.Linear for m in q.modules())  # every Linear was replaced
    x = torch.randn(32, 64)
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.9
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert any(type(m) is nn.Linear for m in model.modules())  # the original is left as it was


def test_dynamic_int8_on_a_transformer_quantizes_every_projection(tmp_path):
    from textkit import tiny_bert  # skips without transformers

    from distill.models.hf import load_classifier
    model = load_classifier(tiny_bert(str(tmp_path / "b")), ["a", "b"], "t").eval()
    q = dynamic_int8(model)
    # 4 layers x (query, key, value, attention output, intermediate, output) + pooler + classifier
    assert int8_linear_count(q) == 4 * 6 + 2
    x = torch.tensor([[101, 2054, 2003, 1996, 3007, 102, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=0.05)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_weights(precision, dtype):
    model = build_model({"model": "mlp"}, (8,), 3)
    half = cast_weights(model, precision)
    assert all(p.dtype == dtype for p in half.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    with torch.no_grad():
        assert torch.allclose(half(torch.ones(2, 8, dtype=dtype)).float(), model(torch.ones(2, 8)), atol=0.05)
    with pytest.raises(UserError, match="choose one of fp16, bf16"):
        cast_weights(model, "int4")
