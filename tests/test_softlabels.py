"""The soft-label cache: miss, hit, invalidation, memory mapping, no partial entries."""
import json
import os

import numpy as np
import torch
from torch import nn

from distill.teachers import CachedOutputs, cache_key, load_or_build


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_miss_then_hit_and_values(tmp_path):
    teacher, x = _teacher(), torch.randn(50, 6)
    out, hit = load_or_build(teacher, x, "k1", str(tmp_path), [], batch_size=16)
    assert not hit
    out2, hit2 = load_or_build(teacher, x, "k1", str(tmp_path), [], batch_size=16)
    assert hit2
    assert isinstance(out2.logits, np.memmap)  # read back memory-mapped, not loaded into RAM
    with torch.no_grad():
        np.testing.assert_allclose(out2.logits, teacher(x).numpy(), rtol=1e-5, atol=1e-6)
    idx = torch.tensor([7, 3, 49])
    got = out2.batch(idx)
    logits, feats = got.logits, got.features
    np.testing.assert_array_equal(logits.numpy(), np.asarray(out.logits)[[7, 3, 49]])
    assert feats == {}


def test_features_are_cached_by_layer_name(tmp_path):
    teacher, x = _teacher(), torch.randn(20, 6)
    out, _ = load_or_build(teacher, x, "k2", str(tmp_path), ["1"], batch_size=8)
    assert out.features["1"].shape == (20, 16)
    with torch.no_grad():
        np.testing.assert_allclose(out.features["1"], torch.relu(teacher[0](x)).numpy(), rtol=1e-5, atol=1e-6)


def test_key_changes_with_teacher_data_and_layers():
    k = cache_key("teacherA", "dataA", [])
    assert k == cache_key("teacherA", "dataA", [])
    assert len({k, cache_key("teacherB", "dataA", []), cache_key("teacherA", "dataB", []),
                cache_key("teacherA", "dataA", ["layer1"]), cache_key("teacherA", "dataA", [], {"device": "cuda"}),
                cache_key("teacherA", "dataA", [], {"batch": 7})}) == 6


def test_topk_entry_names_a_device_off_the_cpu_only():
    from distill.teachers.topk import expected
    cpu = expected("t", "tok", 100, 8, 1.0, "d", 10)
    assert "device" not in cpu and expected("t", "tok", 100, 8, 1.0, "d", 10, {"device": "cuda"}) == {
        **cpu, "device": "cuda"}


def test_partial_entry_is_not_a_hit(tmp_path):
    entry = tmp_path / "k3"
    entry.mkdir()
    np.save(entry / "logits.npy", np.zeros((5, 3), np.float32))  # a crash before meta.json was written
    teacher, x = _teacher(), torch.randn(5, 6)
    out, hit = load_or_build(teacher, x, "k3", str(tmp_path), [], batch_size=4)
    assert not hit  # the partial entry was rebuilt, not served
    assert os.path.isfile(entry / "meta.json")  # ... and is complete now
    with torch.no_grad():
        np.testing.assert_allclose(out.logits, teacher(x).numpy(), rtol=1e-5, atol=1e-6)  # not the zeros
    again, hit = load_or_build(teacher, x, "k3", str(tmp_path), [], batch_size=4)
    assert hit
    np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(out.logits))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".distill-tmp-")]  # the temp folder is gone


def test_cached_outputs_batch_returns_tensors():
    c = CachedOutputs(np.arange(12, dtype=np.float32).reshape(4, 3), {"f": np.ones((4, 2), np.float32)})
    got = c.batch(torch.tensor([2, 0]))
    logits, feats = got.logits, got.features
    assert logits.tolist() == [[6, 7, 8], [0, 1, 2]] and feats["f"].shape == (2, 2)


def test_stale_temp_folders_are_swept(tmp_path):
    stale, fresh = tmp_path / ".distill-tmp-old", tmp_path / ".distill-tmp-live"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))
    load_or_build(_teacher(), torch.randn(4, 6), "k", str(tmp_path), [], batch_size=4)
    assert not stale.exists() and fresh.exists()


def test_weights_hash_ignores_metadata(tmp_path):
    from distill.io import save_model, sha256_file, weights_sha256
    t = _teacher()
    save_model(t, str(tmp_path / "a.safetensors"), {"train_time_s": 1.0})
    save_model(t, str(tmp_path / "b.safetensors"), {"train_time_s": 2.0})
    assert sha256_file(str(tmp_path / "a.safetensors")) != sha256_file(str(tmp_path / "b.safetensors"))
    u = _teacher()
    assert weights_sha256(t) == weights_sha256(u)
    with torch.no_grad():
        u[0].weight[0, 0] += 1e-6
    assert weights_sha256(t) != weights_sha256(u)


def test_a_student_is_distilled_again_from_a_teacher_of_the_same_weights_and_other_modules(tmp_path):
    """The student stage named its teacher by the weights alone: a teacher given ReLU -> Tanh, same weights,
    said "student: inputs unchanged" and kept the student distilled from the other one."""
    from safetensors.torch import save_file
    from distill import Recipe, run
    from distill.models import build_model
    arch = ["Flatten()", "Linear(64, 32)", "{}()", "Linear(32, 10)"]
    torch.manual_seed(0)
    save_file(build_model({"arch": [a.format("ReLU") for a in arch]}, (1, 8, 8), 10).state_dict(),
              str(tmp_path / "t.safetensors"))
    said = []
    for act in ("ReLU", "Tanh"):
        said.clear()
        sets = ["teacher.model=null", "teacher.args={}", f"teacher.checkpoint={tmp_path / 't.safetensors'}",
                f"teacher.arch={[a.format(act) for a in arch]}", "train.epochs=1", "data.train_subset=300",
                "monitor.gradients=false"]
        run(Recipe.load("digits", sets), out=str(tmp_path / "run"), echo=said.append, overwrite=True)
    assert not any(m.startswith("student: inputs unchanged") for m in said), said
    assert any(m.startswith("student_scratch: inputs unchanged") for m in said), said  # (it has no teacher)


def test_cache_entries_of_teachers_with_the_same_weights_and_other_modules_differ():
    """ReLU or Tanh between the same Linear layers: one weights hash, two functions. The soft-label key was the
    weights hash alone, and the Tanh teacher's run was served the ReLU teacher's cached logits."""
    from distill.io import model_sha256
    relu = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    tanh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    tanh.load_state_dict(relu.state_dict())
    assert model_sha256(relu) != model_sha256(tanh)
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    twin.load_state_dict(relu.state_dict())
    assert model_sha256(relu) == model_sha256(twin)


def test_a_damaged_entry_is_one_line_naming_it(tmp_path):
    """An entry whose logits file was deleted or cut short after it was written gave a FileNotFoundError or
    numpy's "mmap length is greater than file size" traceback."""
    import pytest
    from distill.errors import UserError
    teacher, x = _teacher(), torch.randn(30, 6)
    load_or_build(teacher, x, "k4", str(tmp_path), ["1"], batch_size=8)
    logits = tmp_path / "k4" / "logits.npy"
    with open(logits, "r+b") as fh:
        fh.truncate(logits.stat().st_size - 40)
    with pytest.raises(UserError, match=r"k4: a cached teacher output is unreadable .*delete the folder to rebuild"):
        load_or_build(teacher, x, "k4", str(tmp_path), ["1"], batch_size=8)
    logits.unlink()
    with pytest.raises(UserError, match=r"k4: a cached teacher output is unreadable"):
        load_or_build(teacher, x, "k4", str(tmp_path), ["1"], batch_size=8)
    load_or_build(teacher, x[:10], "k5", str(tmp_path), ["1"], batch_size=8)  # a file of another entry's length
    (tmp_path / "k5" / "feat_0.npy").replace(tmp_path / "k4" / "feat_0.npy")
    load_or_build(teacher, x, "k6", str(tmp_path), ["1"], batch_size=8)
    (tmp_path / "k6" / "logits.npy").replace(logits)
    with pytest.raises(UserError, match=r"k4: feat_0.npy holds another number of samples than the 30"):
        load_or_build(teacher, x, "k4", str(tmp_path), ["1"], batch_size=8)
    meta = tmp_path / "k6" / "meta.json"
    for damaged in ({"n": 30}, {"n": 30, "layers": 5}, {"layers": ["1"]}, {"n": "30", "layers": ["1"]}):
        meta.write_text(json.dumps(damaged))  # (a KeyError or TypeError traceback)
        with pytest.raises(UserError, match=r"k6: meta.json is not what distill writes .*delete the folder"):
            load_or_build(teacher, x, "k6", str(tmp_path), ["1"], batch_size=8)
