"""Data loading: splits, normalisation on train statistics only, .npz layouts, augmentation."""
import time

import numpy as np
import pytest
import torch

from distill.data import augment, load_data
from distill.errors import UserError
from distill.recipe import SCHEMA, validate_section


def data_cfg(**kw):
    return validate_section(kw, SCHEMA["data"], "data")


def test_digits_split_is_stratified_and_disjoint():
    d = load_data(data_cfg(dataset="digits", val_fraction=0.1, test_fraction=0.2))
    n = len(d.y_train) + len(d.y_val) + len(d.y_test)
    assert n == 1797 and d.num_classes == 10 and d.input_shape == (64,)
    counts = torch.bincount(d.y_val, minlength=10)
    assert counts.min() >= 14 and counts.max() <= 20  # every class present in proportion
    # normalised with the statistics of the training part only
    assert d.x_train.mean().abs() < 1e-4 and abs(d.x_train.std(0)[d.x_train.std(0) > 0.1].mean() - 1) < 0.05


def test_digits_as_image_and_breast_cancer():
    assert load_data(data_cfg(dataset="digits", as_image=True)).input_shape == (1, 8, 8)
    bc = load_data(data_cfg(dataset="breast_cancer"))
    assert bc.num_classes == 2 and bc.input_shape == (30,) and bc.class_names == ["malignant", "benign"]


def test_fingerprint_follows_preprocessing():
    a = load_data(data_cfg(dataset="digits")).fingerprint
    assert a == load_data(data_cfg(dataset="digits")).fingerprint
    assert a != load_data(data_cfg(dataset="digits", transforms={"normalize": False})).fingerprint
    assert a != load_data(data_cfg(dataset="digits", split_seed=1)).fingerprint


def _npz(tmp_path, shape=(40, 8, 8, 3)):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    y = np.arange(shape[0]) % 4
    np.savez(path, x_train=rng.integers(0, 255, shape, dtype=np.uint8), y_train=y.astype(np.uint8),
             x_test=rng.integers(0, 255, (12, *shape[1:]), dtype=np.uint8), y_test=(np.arange(12) % 4).astype(np.uint8))
    return str(path)


def test_npz_channels_last_and_grey(tmp_path):
    d = load_data(data_cfg(dataset="npz", path=_npz(tmp_path), val_fraction=0.2))
    assert d.input_shape == (3, 8, 8) and d.image and len(d.stats["mean"]) == 3
    g = load_data(data_cfg(dataset="npz", path=_npz(tmp_path, (40, 8, 8)), val_fraction=0.2))
    assert g.input_shape == (1, 8, 8)
    # two channels last were read as 8 channels of 8 x 2 images; small sides were taken for channels
    for shape, want in (((40, 8, 8, 2), (2, 8, 8)), ((40, 4, 4, 3), (3, 4, 4)), ((40, 1, 4, 4), (1, 4, 4)),
                        ((40, 2, 8, 8), (2, 8, 8)), ((40, 16, 16, 8), (8, 16, 16)), ((40, 8, 16, 16), (8, 16, 16)),
                        ((40, 8, 16, 24), (8, 16, 24)), ((40, 16, 16, 16), (16, 16, 16))):
        # (8-band images channels last were read as 16 channels of 16 x 8 images; channels first stay as they are)
        assert load_data(data_cfg(dataset="npz", path=_npz(tmp_path, shape))).input_shape == want, shape
    with pytest.raises(UserError, match=r"d.npz: images of shape \(2, 5, 3\) could be channels-first"):
        load_data(data_cfg(dataset="npz", path=_npz(tmp_path, (40, 2, 5, 3))))


def test_npz_missing_arrays(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((4, 2)), y_train=np.zeros(4))
    with pytest.raises(UserError, match="missing arrays"):
        load_data(data_cfg(dataset="npz", path=str(p)))


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = augment(x, {"random_crop": 1, "hflip": True}, gen)
    assert out.shape == x.shape
    same = augment(x, {"random_crop": 1, "hflip": True}, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)  # seeded: repeatable
    flipped = augment(x, {"random_crop": 0, "hflip": True}, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    # a crop of the zero-padded image: every output pixel is a pixel of x or a padding zero
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


@pytest.mark.parametrize("y_train, message", [
    (np.zeros(40, np.uint8), "single class"),
    (np.arange(40) % 4 - 1, "negative label"),
    (np.linspace(0, 3, 40), "whole class indices"),
    (np.zeros((40, 2), np.uint8), "1-D array"),
])
def test_bad_labels_are_refused(tmp_path, y_train, message):
    p = tmp_path / "l.npz"
    np.savez(p, x_train=np.zeros((40, 4, 4), np.uint8), y_train=y_train, x_test=np.zeros((8, 4, 4), np.uint8),
             y_test=np.arange(8) % 4)
    with pytest.raises(UserError, match=message):
        load_data(data_cfg(dataset="npz", path=str(p), val_fraction=0.2))


def test_loader_workers_give_the_same_batches_as_the_main_process(tmp_path):
    from distill.engine.sampling import epoch_batches
    cfg = data_cfg(dataset="npz", path=_npz(tmp_path), val_fraction=0.2, batch_size=8,
                   transforms={"random_crop": 2, "hflip": True})
    d = load_data(cfg)
    inline = list(epoch_batches(d, cfg, torch.Generator().manual_seed(3)))
    rng = torch.get_rng_state()
    workers = list(epoch_batches(d, {**cfg, "workers": 2}, torch.Generator().manual_seed(3)))
    # (the loader's seed is its own: a draw from the global RNG moved dropout's, and a resumed run differed)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(inline) == len(workers) == 4
    for a, b in zip(inline, workers):
        (xa, ya, ia), (xb, yb, ib) = a.micro[0], b.micro[0]
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib) and a.n == len(ia)
    first = inline[0].micro[0]
    assert not torch.equal(first.x, d.x_train[first.idx])  # augmented, not the stored images


_GROUP_SIGNALS = """
import json, os, signal, sys, torch
from distill.data import load_data
from distill.engine.sampling import epoch_batches
cfg = json.loads(sys.argv[1])
d, got = load_data(cfg), []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # (the training process's handler: it stops later)
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
runs = []
for attempt in range(6):  # a signal to the group as the workers start (attempt > 0) or mid-epoch (attempt 0)
    loader = iter(epoch_batches(d, {**cfg, "workers": 2}, torch.Generator().manual_seed(3)))
    batches = [next(loader).micro[0].idx.tolist()] if attempt == 0 else []
    alone = alone if attempt else [os.getpgid(w.pid) == w.pid for w in loader._workers]
    os.killpg(0, signal.SIGTERM if attempt % 2 else signal.SIGINT)
    runs.append(batches + [s.micro[0].idx.tolist() for s in loader])
print(json.dumps({"runs": runs, "got": got, "alone": alone}))
"""


def test_loader_workers_leave_a_stop_signal_to_the_training_process(tmp_path):
    """Ctrl-C signals the terminal's foreground process group, torchrun each process's group: a loader worker
    in it died of the signal and failed the step in progress, before the trainer could stop at its end and
    checkpoint. Workers move to a group of their own, and one signalled as it starts, before it moved, is not
    killed either (that failed CI about half the time)."""
    import json
    import subprocess
    import sys
    from distill.engine.sampling import epoch_batches
    cfg = data_cfg(dataset="npz", path=_npz(tmp_path), val_fraction=0.2, batch_size=8)
    expected = [s.micro[0].idx.tolist() for s in epoch_batches(load_data(cfg), cfg, torch.Generator().manual_seed(3))]
    out = subprocess.run([sys.executable, "-c", _GROUP_SIGNALS, json.dumps(cfg)], capture_output=True, text=True,
                         timeout=120, start_new_session=True)  # (its own group, the one it signals)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["runs"] == [expected] * 6 and len(res["got"]) == 6 and res["alone"] == [True, True]


def test_a_loader_worker_still_ends_when_the_loader_ends_it(tmp_path):
    """A worker that ignored SIGTERM made the process wait for it forever at exit (multiprocessing joins its
    workers after terminating them): CI hung on one. Nor does it keep the training process's handler."""
    import signal
    from distill.engine.sampling import epoch_batches
    cfg = data_cfg(dataset="npz", path=_npz(tmp_path), val_fraction=0.2, batch_size=8)
    old = signal.signal(signal.SIGTERM, lambda s, f: None)
    try:
        loader = iter(epoch_batches(load_data(cfg), {**cfg, "workers": 1}, torch.Generator().manual_seed(3)))
        next(loader)
    finally:
        signal.signal(signal.SIGTERM, old)
    worker = loader._workers[0]
    with pytest.raises(RuntimeError, match="killed by signal: Terminated"):  # (the loader's SIGCHLD handler)
        worker.terminate()
        for _ in range(100):
            time.sleep(0.1)
    worker.join(timeout=5)
    if worker.is_alive():
        worker.kill()
    assert worker.exitcode == -signal.SIGTERM


def test_a_global_batch_is_shared_out_whole_over_processes_and_micro_batches(tmp_path):
    """Process r of 2, accumulating 2: micro-batches 2r and 2r+1 of the same global batch; together the 4
    are the batch one process draws, each sample once, and augmented alike whether made inline or in workers."""
    from distill.engine.sampling import Split, epoch_batches
    cfg = data_cfg(dataset="npz", path=_npz(tmp_path), val_fraction=0.2, batch_size=8,
                   transforms={"random_crop": 2, "hflip": True})
    d = load_data(cfg)
    whole = list(epoch_batches(d, cfg, torch.Generator().manual_seed(3)))
    shares = [list(epoch_batches(d, {**cfg, "workers": w}, torch.Generator().manual_seed(3), split=Split(r, 2, 2)))
              for r, w in ((0, 0), (1, 2))]
    assert len(whole) == len(shares[0]) == len(shares[1])
    for one, *mine in zip(whole, *shares):
        idx = torch.cat([b.idx for share in mine for b in share.micro])
        assert torch.equal(idx, one.micro[0].idx) and all(s.n == len(idx) for s in mine)
        assert all(len(b.idx) == 2 for share in mine for b in share.micro)


def test_csv_with_named_classes_and_a_test_file(tmp_path):
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    rows = ["," .join(list(d.feature_names) + ["diagnosis"])]
    rows += [",".join([f"{v:.6g}" for v in x] + [d.target_names[t]]) for x, t in zip(d.data, d.target)]
    (tmp_path / "train.csv").write_text("\n".join(rows[:450]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([rows[0]] + rows[450:]) + "\n")
    b = load_data(data_cfg(dataset="csv", path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"),
                           label_column="diagnosis"))
    assert b.class_names == ["benign", "malignant"] and b.input_shape == (30,)
    assert len(b.y_test) == 569 - 449 and len(b.y_train) + len(b.y_val) == 449
    assert int((b.y_test == 1).sum()) == int((d.target[449:] == 0).sum())  # malignant -> index 1


def test_csv_with_a_byte_order_mark_reads_its_first_column_by_name(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffa,label\n".encode() + b"".join(
        f"{i},{'xy'[i % 2]}\n".encode() for i in range(40)))
    b = load_data(data_cfg(dataset="csv", path=str(tmp_path / "bom.csv")))
    assert b.class_names == ["x", "y"] and b.input_shape == (1,)


def test_csv_integer_labels_sort_numerically(tmp_path):
    (tmp_path / "d.csv").write_text("f,label\n" + "".join(f"{i},{[2, 10][i % 2]}\n" for i in range(40)))
    b = load_data(data_cfg(dataset="csv", path=str(tmp_path / "d.csv"), val_fraction=0.2))
    assert b.class_names == ["2", "10"]


def test_a_feature_constant_in_training_is_centred_not_blown_up():
    d = load_data(data_cfg(dataset="digits"))
    constant = (d.x_train.std(0) == 0)  # border pixels that are always 0 in the training split
    assert bool(constant.any())
    assert float(d.x_test.abs().max()) < 100  # dividing by a tiny std made some test values 62,500
    assert float(d.x_test[:, constant].abs().max()) <= 16  # only centred: the raw pixel range


def test_too_few_rows_for_a_stratified_split_is_one_clear_error():
    with pytest.raises(UserError, match=r"data.val_fraction=0.1: cannot split .* rows with every class"):
        load_data(data_cfg(dataset="digits", train_subset=60))


def test_a_split_that_keeps_no_row_of_a_class_for_training_names_its_key_and_the_class(tmp_path):
    """scikit-learn's stratified split may leave a rare class out of a small side: 1 in 200 labelled rows of
    TREC kept no ABBR question, and the teacher and the scratch student never saw one, silently. (A train_subset
    that dropped one blamed the test file.)"""
    rows = "".join(f"{i},{'rare' if i % 50 == 0 else 'ab'[i % 2]}\n" for i in range(400))
    (tmp_path / "d.csv").write_text("f,label\n" + rows)
    (tmp_path / "t.csv").write_text("f,label\n0,rare\n1,a\n2,b\n")
    cfg = dict(dataset="csv", path=str(tmp_path / "d.csv"), val_fraction=0.2)
    with pytest.raises(UserError, match=r"^data.label_fraction=0.02: keeps 5 training rows, none of class rare; "
                                        r"use more rows or another data.label_fraction$"):
        load_data(data_cfg(**cfg, label_fraction=0.02))
    with pytest.raises(UserError, match=r"^data.train_subset=20: keeps 20 training rows, none of class rare"):
        load_data(data_cfg(**cfg, test_path=str(tmp_path / "t.csv"), train_subset=20))
    assert int((load_data(data_cfg(**cfg, label_fraction=0.2)).y_train == 2).sum()) >= 1  # (kept where it can be)


def test_rows_set_aside_need_not_hold_every_class():
    """A subset or a labelled part of nearly every row leaves fewer rows aside than there are classes: they are
    drawn without strata, where a scored split (test, validation) is refused."""
    full = load_data(data_cfg(dataset="digits", val_fraction=0.15))
    n = len(full.y_train) + len(full.y_val)
    part = load_data(data_cfg(dataset="digits", val_fraction=0.15, train_subset=n - 7))
    assert len(part.y_train) + len(part.y_val) == n - 7 and len(part.y_train.unique()) == 10
    assert torch.equal(part.y_test, full.y_test)
    most = load_data(data_cfg(dataset="digits", val_fraction=0.15, label_fraction=0.995))
    assert 0 < len(most.x_unlabelled) < 10 and len(most.y_train) + len(most.x_unlabelled) == len(full.y_train)


def test_a_subset_of_more_rows_than_the_data_has_is_said(tmp_path):
    from distill import Recipe, RunDir
    said = []
    data = RunDir(Recipe.load("digits", ["data.train_subset=5000"]), str(tmp_path / "r"), said.append).data
    assert said == ["warning: data.train_subset=5000: the data has 1,437 training rows, so it keeps every one"]
    assert len(data.y_train) + len(data.y_val) + len(data.x_unlabelled) == 1437  # (a fifth labelled: digits')
    for subset, warned in ((1437, True), (600, False)):  # (a subset that applied was said to keep every row)
        said.clear()
        RunDir(Recipe.load("digits", [f"data.train_subset={subset}"]), str(tmp_path / str(subset)), said.append).data
        assert bool(said) == warned, said


def test_a_positive_class_is_said_to_do_nothing_on_ten_classes(tmp_path):
    """It names the class that AUC, sensitivity and specificity score: with ten classes none is measured, and
    the setting was ignored without a word."""
    from distill import Recipe, RunDir
    said = []
    RunDir(Recipe.load("digits", ["evaluate.positive_class=3"]), str(tmp_path / "r"), said.append).data
    assert said == ["warning: evaluate.positive_class: 3 does nothing: the data has 10 classes (it names the class "
                    "that auc, sensitivity, specificity score, with two classes)"]
    said.clear()
    RunDir(Recipe.load("breast_cancer"), str(tmp_path / "b"), said.append).data  # (two classes: positive_class 0)
    assert said == []


def test_label_fraction_keeps_a_stratified_labelled_part_and_the_rest_as_inputs_only():
    full = load_data(data_cfg(dataset="digits", val_fraction=0.15))
    part = load_data(data_cfg(dataset="digits", val_fraction=0.15, label_fraction=0.2))
    assert full.x_unlabelled is None and full.fingerprint == load_data(data_cfg(dataset="digits",
                                                                               val_fraction=0.15)).fingerprint
    assert len(part.y_train) + len(part.x_unlabelled) == len(full.y_train)
    assert len(part.y_train) == pytest.approx(0.2 * len(full.y_train), abs=1)
    assert torch.bincount(part.y_train, minlength=10).min() >= 20  # every class labelled, in proportion
    assert torch.equal(part.y_val, full.y_val) and torch.equal(part.y_test, full.y_test)  # same val and test
    # normalised with every training input, labelled or not: the same statistics as with all labels
    assert all(np.allclose(part.stats[k], full.stats[k], rtol=1e-5) for k in ("mean", "std"))
    assert part.fingerprint != full.fingerprint
    from distill.data.datasets import with_teacher_labelled
    student = with_teacher_labelled(part, part.x_unlabelled)
    assert len(student.y_train) == len(full.y_train) and (student.y_train == -1).sum() == len(part.x_unlabelled)
    assert student.x_unlabelled is None and student.fingerprint not in (part.fingerprint, full.fingerprint)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_label_fraction_out_of_range_is_refused(value):
    from distill import Recipe
    with pytest.raises(UserError, match=r"data.label_fraction.*must be > 0 and <= 1"):
        Recipe.load("digits", [f"data.label_fraction={value}"])


def test_the_teacher_and_scratch_train_on_the_labels_and_the_student_on_every_input(tmp_path):
    import json

    from distill import Recipe, run
    run(Recipe.load("digits", ["train.epochs=1", "teacher.train.epochs=1", "monitor.every=1",
                               "monitor.gradients=false"]), str(tmp_path), echo=lambda m: None)
    assert json.load(open(tmp_path / "stages.json"))["student"]["added"] == {"unlabelled": 977}
    last = {}
    for line in open(tmp_path / "log.jsonl"):
        r = json.loads(line)
        if "step" in r:
            last[r["model"]] = r["step"]
    # one epoch: 244 labelled digits are 4 batches of 64; the student's 1,221 (labelled or not) are 20
    assert last == {"teacher": 4, "student_scratch": 4, "student": 20}


def test_npz_of_uint8_training_pixels_and_test_pixels_already_in_0_1_loads(tmp_path):
    """uint8 pixels are scaled to [0, 1]; a float split already there is the same scale (a float split on
    0..255 beside uint8 is refused: tests/test_bad_inputs.py)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (52, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x[:40], y_train=np.arange(40) % 4, x_test=x[40:].astype(np.float32) / 255,
             y_test=np.arange(12) % 4)
    d = load_data(data_cfg(dataset="npz", path=str(tmp_path / "d.npz"), transforms={"normalize": False}))
    assert float(d.x_train.max()) <= 1 and float(d.x_test.max()) <= 1 and float(d.x_test.max()) > 0.5


def test_inputs_larger_than_a_model_header_may_declare_are_refused_when_read(monkeypatch):
    """A model file whose header declares inputs over io.MAX_INPUT_VALUES is refused when loaded; data of that
    size is refused when read, not trained on into files no command could load."""
    import distill.data.datasets as datasets
    monkeypatch.setattr(datasets, "MAX_INPUT_VALUES", 32)  # (digits: 64 values an input)
    with pytest.raises(UserError, match=r"^digits: inputs of shape \(64,\) hold 64 values each, over the 32 distill "
                                        r"reads; resize them$"):
        load_data(data_cfg(dataset="digits"))
