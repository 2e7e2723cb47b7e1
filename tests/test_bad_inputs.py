"""The catalogue of user mistakes. Each one: exit code 2, one line naming the file/key/value and the fix, no
traceback, and no run folder made (or the earlier run left exactly as it was)."""
import errno
import json
import os
import time

import numpy as np
import pytest
import torch

from distill.cli import main
from distill.io import save_model
from distill.models import build_model

GOOD = ("name: t\ndata: {dataset: digits, as_image: true}\nteacher: {model: cnn, args: {channels: [4], hidden: 8}}\n"
        "student: {model: mlp, args: {hidden: [8]}}\ntrain: {epochs: 1}\n")

TABULAR = ("name: t\ndata: {dataset: breast_cancer}\nteacher: {model: mlp, args: {hidden: [8]}}\n"
           "student: {model: mlp, args: {hidden: [4]}}\ntrain: {epochs: 1}\n")


def npz(path, n=40, classes=4, **change):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), "y_train": np.arange(n) % classes,
              "x_test": rng.integers(0, 255, (12, 8, 8), dtype=np.uint8), "y_test": np.arange(12) % classes}
    arrays.update(change)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def ckpt(path, spec, shape=(1, 8, 8), classes=10, names=None, **meta):
    model = build_model(spec, shape, classes)
    save_model(model, str(path), {"spec": spec, "input_shape": list(shape), "num_classes": classes,
                                  "class_names": names or [str(i) for i in range(classes)], **meta})
    return str(path)


def files(d):
    """Every file under d with its bytes: what 'left exactly as it was' compares."""
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(d) for f in fs}


def recipe_with(tmp, text):
    p = tmp / "recipe.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


CASES = {
    # recipe file and YAML
    "malformed yaml": (lambda t: [recipe_with(t, GOOD + "train: {epochs: [1\n")], "malformed YAML"),
    "python tag": (lambda t: [recipe_with(t, GOOD + "seed: !!python/object/apply:os.system [ls]\n")],
                   "YAML tags such as !!python are not allowed"),
    "not a mapping": (lambda t: [recipe_with(t, "[1, 2]\n")], "a recipe is a mapping of sections"),
    "recipe missing": (lambda t: [str(t / "nope.yaml")], "no such recipe file or bundled recipe"),
    "recipe is a folder": (lambda t: [str(t)], "not a run folder (no recipe.yaml)"),
    "not utf-8": (lambda t: [recipe_with(t, GOOD.encode() + b"# caf\xe9\n")], "not UTF-8 text"),
    # keys, types and ranges
    "unknown section": (lambda t: [recipe_with(t, GOOD + "distil: {alpha: 0.5}\n")],
                        "distil: unknown key (did you mean 'distill'?)"),
    "misspelt key": (lambda t: [recipe_with(t, GOOD.replace("epochs", "epoch"))],
                     "train.epoch: unknown key (did you mean 'epochs'?)"),
    "wrong type": (lambda t: [recipe_with(t, GOOD.replace("epochs: 1", "epochs: ten"))],
                   "train.epochs: expected int, got str 'ten'"),
    "negative lr": (lambda t: [recipe_with(t, GOOD + "distill: {}\n"), "--set", "train.optimizer.lr=-0.01"],
                    "train.optimizer.lr: must be > 0, got -0.01"),
    "zero temperature": (lambda t: [recipe_with(t, GOOD), "--set", "distill.temperature=0"],
                         "distill.temperature: must be > 0, got 0"),
    "negative temperature": (lambda t: [recipe_with(t, GOOD), "--set", "distill.temperature=-2"],
                             "distill.temperature: must be > 0, got -2"),
    "alpha above 1": (lambda t: [recipe_with(t, GOOD), "--set", "distill.alpha=1.2"],
                      "distill.alpha: must be between 0 and 1, got 1.2"),
    "alpha below 0": (lambda t: [recipe_with(t, GOOD), "--set", "distill.alpha=-0.1"],
                      "distill.alpha: must be between 0 and 1, got -0.1"),
    "zero batch size": (lambda t: [recipe_with(t, GOOD), "--set", "data.batch_size=0"],
                        "data.batch_size: must be > 0, got 0"),
    "unknown optimizer": (lambda t: [recipe_with(t, GOOD), "--set", "train.optimizer.name=adamm"],
                          "'adamm' is not one of sgd, adam, adamw (did you mean 'adam'?)"),
    "unknown metric": (lambda t: [recipe_with(t, GOOD + "evaluate: {metrics: [f1]}\n")],
                       "evaluate.metrics[0]: unknown metric 'f1'"),
    "infinite temperature": (lambda t: [recipe_with(t, GOOD), "--set", "distill.temperature=1e999"],
                             "distill.temperature: expected a finite number, got inf"),
    "nan alpha": (lambda t: [recipe_with(t, GOOD), "--set", "distill.alpha=.nan"],
                  "distill.alpha: expected a finite number, got nan"),
    "infinite lr": (lambda t: [recipe_with(t, GOOD), "--set", "train.optimizer.lr=.inf"],
                    "train.optimizer.lr: expected a finite number, got inf"),
    "bad --set": (lambda t: [recipe_with(t, GOOD), "--set", "train.epochs"], "expected KEY.PATH=VALUE"),
    "unknown --set key": (lambda t: [recipe_with(t, GOOD), "--set", "student.modle=mlp"],
                          "unknown key 'modle' (did you mean 'model'?)"),
    "path traversal in name": (lambda t: [recipe_with(t, GOOD.replace("name: t", "name: ../../escape"))],
                               "name: use letters, digits"),
    "zero seeds": (lambda t: [recipe_with(t, GOOD), "--seeds", "0"], "--seeds: expected a positive number"),
    "per-model normalisation": (lambda t: [recipe_with(t, GOOD), "--set", "teacher.augment.normalize=false"],
                                "teacher.augment.normalize: normalisation is the same for every model"),
    "augmenting vectors": (lambda t: [recipe_with(t, TABULAR), "--set", "teacher.augment.random_crop=1"],
                           "teacher.augment: random_crop and hflip augment images, and these inputs are not images"),
    "crop shift as large as the image": (lambda t: [recipe_with(t, GOOD), "--set", "data.transforms.random_crop=100"],
                                         "data.transforms.random_crop: 100 pixels of shift, on images of 8x8"),
    "flipping vectors": (lambda t: [recipe_with(t, TABULAR), "--set", "data.transforms.hflip=true"],
                         "data.transforms: random_crop and hflip augment images"),
    "negative measure_every": (lambda t: [recipe_with(t, GOOD), "--set", "monitor.measure_every=-1"],
                               "monitor.measure_every: must be >= 0, got -1"),
    "zero label fraction": (lambda t: [recipe_with(t, GOOD), "--set", "data.label_fraction=0"],
                            "data.label_fraction: must be > 0 and <= 1, got 0"),
    "more loader workers than cores": (lambda t: [recipe_with(t, GOOD), "--set", "data.workers=100000"],
                                       "data.workers: more than the"),
    "more latency threads than cores": (lambda t: [recipe_with(t, GOOD), "--set", "evaluate.threads=100000"],
                                        "evaluate.threads: more than the"),
    "positive class beyond the classes": (lambda t: [recipe_with(t, TABULAR), "--set", "evaluate.positive_class=5"],
                                          "evaluate.positive_class: 5, and the data has 2 classes (malignant, "
                                          "benign): give 0 or 1"),
    "bad answer regex": (lambda t: [recipe_with(t, GOOD), "--set", r"evaluate.exact_match.answer=Answer:\s*(\d+"],
                         "evaluate.exact_match.answer: not a regular expression (missing ), unterminated subpattern"),
    "null setting": (lambda t: [recipe_with(t, GOOD), "--set", "train.epochs=null"],
                     "train.epochs: null (or no value); give one, or leave the key out for its default 20"),
    "empty setting in the file": (lambda t: [recipe_with(t, GOOD + "distill:\n  temperature:\n")],
                                  "distill.temperature: null (or no value)"),
    "seed out of range": (lambda t: [recipe_with(t, GOOD), "--set", "train.seed=-1"],
                          "train.seed: a seed is between 0 and 2**32 - 1"),
    "integer beyond any setting": (lambda t: [recipe_with(t, GOOD), "--set", "data.batch_size=" + "1" + "0" * 30],
                                   "data.batch_size: 1" + "0" * 30 + " is out of range for any setting"),
    "the recipe's own folder as --out": (lambda t: [recipe_with(t, GOOD), "--out", str(t)],
                                         "where the run writes its resolved recipe.yaml over yours"),
    "more processes than cores": (lambda t: [recipe_with(t, GOOD), "--nproc", "100000"],
                                  "--nproc 100000: more processes than this machine's"),
    "batch too small for the processes": (lambda t: [recipe_with(t, GOOD), "--nproc", "2", "--set",
                                                     "data.batch_size=3"],
                                          "data.batch_size: 3 is the global batch, too small for processes x "
                                          "train.accumulate = 2 x 1 micro-batches of two samples or more; give at "
                                          "least 4"),
    "a collective timeout beyond what torch can wait": (  # (a traceback from every process, under --nproc only)
        lambda t: [recipe_with(t, GOOD), "--nproc", "2", "--set", "train.timeout_s=1e15"],
        "train.timeout_s: must be > 0 and <= 1e9 seconds, got 1000000000000000.0"),
    "zero processes": (lambda t: [recipe_with(t, GOOD), "--nproc", "0"],
                       "--nproc: expected a positive number of processes, got 0"),
    "zero accumulation": (lambda t: [recipe_with(t, GOOD), "--set", "train.accumulate=0"],
                          "train.accumulate: must be > 0, got 0"),
    "batch smaller than its micro-batches": (lambda t: [recipe_with(t, GOOD), "--set", "data.batch_size=4",
                                                        "--set", "train.accumulate=8"],
                                             "data.batch_size: 4 is the global batch, too small for processes x "
                                             "train.accumulate = 1 x 8 micro-batches of two samples or more; "
                                             "give at least 16"),
    "unknown method": (lambda t: [recipe_with(t, GOOD), "--set", "distill.method=fitnet"],
                       "distill.method: not a logits loss of the registry; choose from dist, dkd, forward_kl, jsd, kd, "
                                "reverse_kl, skew_kl, skew_reverse_kl, tvd"),
    "negative dkd beta": (lambda t: [recipe_with(t, GOOD), "--set", "distill.dkd.beta=-1"],
                          "distill.dkd.beta: must be >= 0, got -1"),
    "no crd negatives": (lambda t: [recipe_with(t, GOOD), "--set", "distill.crd.negatives=0"],
                         "distill.crd.negatives: must be > 0, got 0"),
    "crd memory banks beyond the machine": (lambda t: [recipe_with(t, GOOD), "--set", "distill.features=[{teacher: "
                                                      "body.1, student: body.2, loss: crd}]", "--set",
                                                      "distill.crd.embed_dim=" + "1" + "0" * 12],
                                            "distill.crd.embed_dim: 1,000,000,000,000 x 1,293 training samples x 2 "
                                            "memory banks: needs about"),
    "attention transfer on vectors": (lambda t: [recipe_with(t, GOOD), "--set",
                                                 "distill.features=[{teacher: head, student: head, loss: at}]"],
                                      "loss at compares (N, C, H, W) maps"),
    # data
    "npz path missing": (lambda t: [recipe_with(t, GOOD.replace("dataset: digits", "dataset: npz"))],
                         "data.path: missing"),
    "npz not found": (lambda t: [recipe_with(t, GOOD.replace("dataset: digits", "dataset: npz, path: no.npz"))],
                      "data.path: file not found: no.npz"),
    "npz garbage": (lambda t: [recipe_with(t, GOOD.replace("dataset: digits", f"dataset: npz, path: {_garbage(t)}"))],
                    "cannot read as .npz"),
    "npz empty file": (lambda t: [recipe_with(t, GOOD.replace("dataset: digits", f"dataset: npz, path: {_empty(t)}"))],
                       "e.npz: cannot read as .npz (neither a zip of arrays nor a NumPy file)"),
    "npz cut short": (lambda t: [recipe_with(t, GOOD.replace("dataset: digits", f"dataset: npz, path: "
                                                                          f"{_cut_short(t)}"))],
                      "c.npz: cannot read as .npz (truncated or not a zip)"),
    "npz that is one array": (lambda t: [recipe_with(t, GOOD.replace("dataset: digits", f"dataset: npz, path: "
                                                                                        f"{_one_array(t)}"))],
                              "a.npz: one array (an .npy file), not an .npz of x_train, y_train, x_test, y_test"),
    "npz missing arrays": (lambda t: [_npz_recipe(t, x_test=None)], "missing arrays ['x_test']"),
    "empty data": (lambda t: [_npz_recipe(t, x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, int))],
                   "y_train is empty"),
    "x and y lengths differ": (lambda t: [_npz_recipe(t, y_train=np.arange(30) % 4)],
                               "x_train has 40 samples but y_train has 30"),
    "single class": (lambda t: [_npz_recipe(t, y_train=np.zeros(40, int), y_test=np.zeros(12, int))],
                     "y_train holds a single class"),
    "negative label": (lambda t: [_npz_recipe(t, y_train=np.arange(40) % 4 - 1)], "negative label -1"),
    "test label outside the train classes": (lambda t: [_npz_recipe(t, y_test=np.arange(12) % 6)],
                                             "y_test has labels [4, 5] that never occur in y_train"),
    "fractional labels": (lambda t: [_npz_recipe(t, y_train=np.linspace(0, 3, 40))], "whole class indices"),
    "nan in features": (lambda t: [_npz_recipe(t, x_train=np.full((40, 8, 8), np.nan, np.float32),
                                               x_test=np.zeros((12, 8, 8), np.float32))],
                        "x_train holds 2560 NaN or Inf values"),
    "csv without the label column": (lambda t: [_csv_recipe(t, "a,b,kind\n1,2,x\n3,4,y\n")],
                                    "no column named 'label' (data.label_column); columns: a, b, kind"),
    "csv not utf-8": (lambda t: [_csv_recipe(t, b"a,label\n1,caf\xe9\n")], "not UTF-8 text (byte"),
    "csv value not a number": (lambda t: [_csv_recipe(t, "a,label\n1,x\nseven,y\n")],
                               "line 3, column 'a': 'seven' is not a number"),
    "csv header naming a column twice": (lambda t: [_csv_recipe(t, "a,label,label\n1,x,2\n3,y,4\n")],
                                         "the header names ['label'] more than once"),
    "npz test images of another size": (lambda t: [_npz_recipe(t, x_test=np.zeros((12, 10, 10), np.uint8))],
                                         "x_test's samples are shaped (1, 10, 10) and x_train's (1, 8, 8)"),
    "label ids with gaps": (lambda t: [_npz_recipe(t, y_train=np.arange(40) % 4 * 3, y_test=np.arange(12) % 4 * 3)],
                            "6 class indices below the largest label 9 never occur (the first: 1)"),
    "csv of labels only": (lambda t: [_csv_recipe(t, "label\nx\ny\n")], "the label column is its only column"),
    "csv ragged row": (lambda t: [_csv_recipe(t, "a,b,label\n1,2,x\n3,y\n")], "line 3 has 2 fields, the header has 3"),
    "csv row without a label": (lambda t: [_csv_recipe(t, "a,label\n1,x\n2,\n3,y\n")],
                                "d.csv: line 3: empty 'label' (data.label_column)"),
    "csv row without a label after blank lines": (lambda t: [_csv_recipe(t, "a,label\n1,x\n\n\n2,\n3,y\n")],
                                                  "d.csv: line 5: empty 'label' (data.label_column)"),
    "npz splits of two pixel types": (lambda t: [_npz_recipe(t, x_test=np.full((12, 8, 8), 200, np.float32))],
                                      "x_train is uint8 and x_test float32"),
    "a test file for data that has its own test split": (
        lambda t: [recipe_with(t, GOOD), "--set", "data.test_path=test.csv"],
        "data.test_path: digits does not read it (its test data is shipped with scikit-learn)"),
    "a data file for generated data": (
        lambda t: [recipe_with(t, GOOD), "--set", "data.dataset=arith", "--set", "data.path=train.jsonl"],
        "data.path: arith does not read it (its data is generated from data.arith)"),
    "cached soft labels for augmented views": (
        lambda t: [recipe_with(t, GOOD), "--set", "distill.teacher_outputs=cached", "--set",
                   "student.augment.random_crop=1"],
        "distill.teacher_outputs: cached soft labels are the teacher's on the training inputs as they are"),
    "tabular data as images": (lambda t: [recipe_with(t, TABULAR), "--set", "data.as_image=true"],
                               "data.as_image: reads digits as 8x8 images"),
    "a subset of language-model data": (lambda t: [recipe_with(t, GOOD), "--set", "data.dataset=arith", "--set",
                                                   "data.as_image=false", "--set", "data.train_subset=10"],
                                        "data.train_subset: not applied to language-model data (arith)"),
    "fewer training rows than micro-batches": (lambda t: [recipe_with(t, TABULAR), "--set", "data.val_fraction=0.992",
                                                          "--set", "train.accumulate=4"],
                                               "training samples, too few for processes x train.accumulate = 1 x 4"),
    "teacher accumulation too large for the processes": (
        lambda t: [recipe_with(t, GOOD), "--nproc", "2", "--set", "data.batch_size=16", "--set",
                   "teacher.train.accumulate=16"], "teacher.train.accumulate = 2 x 16 micro-batches"),
    # models
    "code in a layer spec": (lambda t: [recipe_with(t, GOOD.replace("model: mlp, args: {hidden: [8]}",
                                                                    "arch: [\"__import__('os').system('id')\"]"))],
                             "student.arch[0]"),
    "unknown layer": (lambda t: [recipe_with(t, GOOD.replace("model: mlp, args: {hidden: [8]}",
                                                             "arch: ['Flatten()', 'Linaer(64, 10)']"))],
                      "did you mean 'Linear'"),
    "layer shape mismatch": (lambda t: [recipe_with(t, GOOD.replace("model: mlp, args: {hidden: [8]}",
                                                                    "arch: ['Flatten()', 'Linear(100, 10)']"))],
                             "student.arch[1]: Linear cannot take input of shape (64,)"),
    "wrong number of outputs": (lambda t: [recipe_with(t, GOOD.replace("model: mlp, args: {hidden: [8]}",
                                                                       "arch: ['Flatten()', 'Linear(64, 3)']"))],
                                "the model outputs shape (3,) per sample but the data has 10 classes"),
    "cnn on vectors": (lambda t: [recipe_with(t, TABULAR), "--set", "teacher.model=cnn", "--set", "teacher.args={}"],
                       "teacher.model: 'cnn' needs images (channels, height, width), and these inputs have shape "
                       "(30,): use mlp (digits can be read as images: data.as_image: true)"),
    "layer of width 0": (lambda t: [recipe_with(t, GOOD), "--set", "student.model=null", "--set",
                                    "student.arch=['Flatten()', 'Linear(64, 0)', 'ReLU()', 'Linear(0, 10)']"],
                         "student: 1.weight has no elements: a layer of size 0"),
    "negative layer width": (lambda t: [recipe_with(t, GOOD), "--set", "student.args.hidden=[-4]"],
                             "student.args: hidden must be whole numbers >= 1, got [-4] (model 'mlp')"),
    "fractional cnn width": (lambda t: [recipe_with(t, GOOD), "--set", "teacher.args.hidden=8.5"],
                             "teacher.args: hidden must be a whole number >= 1, got 8.5 (model 'cnn')"),
    "negative channels": (lambda t: [recipe_with(t, GOOD), "--set", "teacher.args.channels=[-1]"],
                          "teacher.args: channels must be whole numbers >= 1, got [-1] (model 'cnn')"),
    "empty student arch": (lambda t: [recipe_with(t, GOOD), "--set", "student.arch=[]"],
                           'student.arch: empty; give the layers, e.g. arch: ["Flatten()", "Linear(64, 10)"]'),
    "empty teacher model": (lambda t: [recipe_with(t, GOOD), "--set", 'teacher.model=""'],
                            "teacher.model: empty; give a model name"),
    "empty assistant arch": (lambda t: [recipe_with(t, GOOD), "--set", "distill.assistants=[{arch: []}]"],
                             "distill.assistants[0].arch: empty; give the layers"),
    "unknown model": (lambda t: [recipe_with(t, GOOD.replace("model: mlp", "model: resnet9"))],
                      "student.model: unknown model 'resnet9'"),
    "bad model argument": (lambda t: [recipe_with(t, GOOD.replace("hidden: [8]", "hiden: [8]"))],
                           "student.args: mlp() got an unexpected keyword argument 'hiden'"),
    # feature distillation
    "feature layer does not exist": (lambda t: [recipe_with(t, GOOD + "distill: {features: [{teacher: body.9, student: body.1}]}\n")],
                                     "no module named 'body.9'"),
    "feature widths differ without a projector": (
        lambda t: [recipe_with(t, GOOD + "distill: {features: [{teacher: body.1, student: body.2, projector: identity}]}\n")],
        "student width 8 != teacher width 4"),
    # checkpoints
    "corrupt safetensors": (lambda t: [_ckpt_recipe(t, _garbage(t, "c.safetensors"))], "not a readable safetensors file"),
    "truncated safetensors": (lambda t: [_ckpt_recipe(t, _truncated(t))], "not a readable safetensors file"),
    "pickle checkpoint": (lambda t: [_ckpt_recipe(t, _pickle(t))], "a pickle-based PyTorch file"),
    "checkpoint of another architecture": (
        lambda t: [_ckpt_recipe(t, ckpt(t / "mlp.safetensors", {"model": "mlp"}), model="model: cnn, ")],
        "holds a model of another architecture ({'model': 'mlp', 'args': {}, 'arch': None}) than teacher gives"),
    "checkpoint of other inputs": (
        lambda t: [_ckpt_recipe(t, ckpt(t / "v.safetensors", {"model": "mlp"}, shape=(64,)))],
        "was trained on inputs shaped (64,) but the data's are (1, 8, 8)"),
    "checkpoint with another class count": (
        lambda t: [_ckpt_recipe(t, ckpt(t / "c3.safetensors", {"model": "mlp"}, classes=3))],
        "was trained for 3 classes but the data has 10"),
    "checkpoint with another class list": (
        lambda t: [_ckpt_recipe(t, ckpt(t / "cn.safetensors", {"model": "mlp"}, names=list("abcdefghij")))],
        "teacher and student must share one class list"),
    "checkpoint of raw inputs": (
        lambda t: [_ckpt_recipe(t, ckpt(t / "raw.safetensors", {"model": "mlp"}, preprocessing={}))],
        "raw.safetensors: it was trained on raw inputs, and data.transforms.normalize is true here; set it to false"),
    "checkpoint of inputs of another scale": (
        lambda t: [_ckpt_recipe(t, ckpt(t / "far.safetensors", {"model": "mlp"}, preprocessing={"normalize": {
            "mean": [100.0], "std": [6.0], "axis": 1, "image": True}}))],
        "far.safetensors: it was trained on inputs of another scale (the median feature's mean "),
    # output
    "output under a file": (lambda t: [recipe_with(t, GOOD), "--out", str(_garbage(t, "afile")) + "/run"],
                            "cannot write"),
    "a file as --out": (lambda t: [recipe_with(t, GOOD), "--out", _garbage(t, "afile")],
                        "afile: not a folder (a file, a device or a pipe)"),
    "stage output missing": (lambda t: ["evaluate", recipe_with(t, GOOD)], "missing; run the stage that makes it"),
    "a folder of other files as --out": (lambda t: [recipe_with(t, GOOD), "--out", _file_in(t, "mine/metrics.json")],
                                         "mine: not a run folder (no recipe.yaml), and it holds metrics.json, which "
                                         "the run would replace"),
    "cache folder is a file": (lambda t: [recipe_with(t, GOOD), "--set", f"output.cache_dir={_garbage(t, 'c')}"],
                               "/c: cannot be the cache folder (File exists)"),
    "cache folder under a file": (lambda t: [recipe_with(t, GOOD), "--set", f"output.cache_dir={_garbage(t, 'c')}/x"],
                                  "/c/x: cannot be the cache folder (Not a directory)"),
    "a run folder's recipe edited by hand": (lambda t: ["evaluate", _file_in(t, "edited/recipe.yaml", "name: x\n")],
                                             "edited/recipe.yaml: teacher: missing model"),
    "tensorboard folder is a file": (lambda t: [recipe_with(t, GOOD), "--tensorboard", "--out", _file_in(t, "run/tensorboard")],
                                     "run/tensorboard is a file; TensorBoard writes a folder there"),
    "a later seed's folder holds another recipe": (
        lambda t: [recipe_with(t, GOOD), "--seeds", "2", "--out", _file_in(t, "seeds/seed_1/recipe.yaml",
                                                                          GOOD.replace("epochs: 1", "epochs: 2"), 2)],
        "seeds/seed_1: the folder holds a run of a different recipe"),
    "a run folder whose recipe no longer loads": (
        lambda t: [recipe_with(t, GOOD), "--out", _file_in(t, "old/recipe.yaml", GOOD.replace(
            "dataset: digits", "dataset: digits, test_path: ignored.csv"))],
        "old: the folder's recipe.yaml no longer loads (data.test_path: digits does not read it"),
}


def _file_in(t, relative, text="x", up=1):
    """A file at t/relative (its folders made); returns the folder `up` levels above it."""
    p = t / relative
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    for _ in range(up):
        p = p.parent
    return str(p)


def _garbage(t, name="g.npz"):
    p = t / name
    p.write_bytes(b"this is not the file you are looking for")
    return str(p)


def _empty(t):
    (t / "e.npz").write_bytes(b"")
    return str(t / "e.npz")


def _one_array(t):
    with open(t / "a.npz", "wb") as fh:  # (np.save appends .npy to a path: a file keeps the name)
        np.save(fh, np.zeros(3))
    return str(t / "a.npz")


def _cut_short(t):
    data = open(npz(t / "full.npz", n=400), "rb").read()  # (an interrupted copy: the zip's directory is lost)
    (t / "c.npz").write_bytes(data[: len(data) // 2])
    return str(t / "c.npz")


def _truncated(t):
    path = ckpt(t / "full.safetensors", {"model": "mlp"})
    data = open(path, "rb").read()
    (t / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    return str(t / "trunc.safetensors")


def _pickle(t):
    torch.save({"w": torch.zeros(2)}, t / "model.pt")
    return str(t / "model.pt")


def _npz_recipe(t, **change):
    return recipe_with(t, GOOD.replace("dataset: digits, as_image: true", f"dataset: npz, path: {npz(t / 'd.npz', **change)}"))


def _csv_recipe(t, content):
    p = t / "d.csv"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return recipe_with(t, GOOD.replace("dataset: digits, as_image: true", f"dataset: csv, path: {p}")
                       .replace("model: cnn, args: {channels: [4], hidden: 8}", "model: mlp"))


def _ckpt_recipe(t, path, model=""):
    return recipe_with(t, GOOD.replace("teacher: {model: cnn, args: {channels: [4], hidden: 8}}",
                                       f"teacher: {{{model}checkpoint: {path}}}"))


def test_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, message = CASES[case]
    args = make(tmp_path)
    command = [args.pop(0)] if args[0] in ("evaluate",) else ["run"]
    before = files(tmp_path)
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    code = main(command + args + out)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert files(tmp_path) == before  # nothing made, nothing changed


def test_the_recipes_own_folder_as_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    """output.dir naming the folder of the recipe file replaced the user's recipe.yaml (its comments, its
    layout) with the resolved one; --out there was refused already."""
    path = recipe_with(tmp_path, "# mine\n" + GOOD + f"output: {{dir: {tmp_path}}}\n")
    assert main(["run", path]) == 2
    assert capsys.readouterr().err.strip().endswith("itself, where the run writes its resolved recipe.yaml over "
                                                    "yours; give another output.dir (or --out)")
    assert open(path).read().startswith("# mine") and sorted(os.listdir(tmp_path)) == ["recipe.yaml"]
    monkeypatch.setenv("HOME", str(tmp_path.parent))  # (--out=~/x reaches distill unexpanded: it got past)
    assert main(["run", path, f"--out=~/{tmp_path.name}"]) == 2
    assert "where the run writes its resolved recipe.yaml over yours" in capsys.readouterr().err
    from distill.cli import _load
    (tmp_path / "log.jsonl").write_text("")  # (a run stopped in its first stage: its own recipe runs again)
    assert _load(path, [], None)[0].cfg["output"]["dir"] == str(tmp_path)


def test_the_recipes_own_folder_is_refused_from_python_too(tmp_path, capsys):
    """The Python API's run() replaced the user's recipe.yaml too (the guard was the command line's); a run's own
    recipe.yaml, in the resolved form it writes, is still its to rewrite."""
    from distill import Recipe, run
    from distill.errors import UserError
    from distill.pipeline.rundir import RunDir
    path = recipe_with(tmp_path, "# mine\n" + GOOD + f"output: {{dir: {tmp_path}}}\n")
    with pytest.raises(UserError, match="over yours; give another output.dir"):
        run(Recipe.load(path))
    assert open(path).read().startswith("# mine") and sorted(os.listdir(tmp_path)) == ["recipe.yaml"]
    mine = tmp_path / "mine"  # `distill run FOLDER` of a folder holding the user's recipe.yaml: named as such
    mine.mkdir()
    (mine / "recipe.yaml").write_text("# mine\n" + GOOD)
    assert main(["run", str(mine)]) == 2
    assert f"{mine}: not a run folder: its recipe.yaml is yours" in capsys.readouterr().err
    assert (mine / "recipe.yaml").read_text().startswith("# mine") and os.listdir(mine) == ["recipe.yaml"]
    resolved = Recipe.load(path)
    (tmp_path / "recipe.yaml").write_text(resolved.to_yaml())  # (as a run stopped before its first record left it)
    assert RunDir(Recipe.load(path)).out == str(tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    from distill.errors import UserError
    with pytest.raises(UserError):
        main(["--debug", "run", recipe_with(tmp_path, GOOD + "trian: {}\n")])


def test_debug_after_the_command_shows_the_traceback_too(tmp_path):
    from distill.errors import UserError
    with pytest.raises(UserError):
        main(["run", recipe_with(tmp_path, GOOD + "trian: {}\n"), "--debug"])
    assert main(["run", recipe_with(tmp_path, GOOD + "trian: {}\n")]) == 2  # (and without it: one line)


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path, monkeypatch):
    """A temp file is made 0600; the file it becomes is readable as the umask allows (a shared run folder)."""
    from distill.io import write_text
    monkeypatch.setattr("distill.io._UMASK", 0o022)  # (what it read at import, whatever this machine's is)
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_text(str(tmp_path / "atomic.txt"), "x")
        assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == os.stat(plain).st_mode & 0o777 == 0o644
        from distill.io import save_model  # (safetensors writes its file anew, 0600: the mode is set again)
        save_model(torch.nn.Linear(2, 2), str(tmp_path / "m.safetensors"), {})
        assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "atomic.txt", 0o600)  # (a file its owner made private stays private when rewritten)
        write_text(str(tmp_path / "atomic.txt"), "y")
        assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == 0o600
        from distill.io import atomic_folder
        with atomic_folder(str(tmp_path / "hf")) as tmp:  # (mkdtemp makes a folder 0700)
            from safetensors.torch import save_file  # (as transformers' save_pretrained writes it: 0600)
            save_file({"w": torch.zeros(1)}, os.path.join(tmp, "model.safetensors"))
        assert os.stat(tmp_path / "hf").st_mode & 0o777 == 0o755
        assert os.stat(tmp_path / "hf" / "model.safetensors").st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_a_folder_left_aside_by_a_crash_between_the_renames_is_put_back_first(tmp_path):
    from distill.io import atomic_folder
    (tmp_path / ".distill-old-hf-x1234567" / "previous").mkdir(parents=True)  # (killed after the old folder went aside)
    (tmp_path / ".distill-old-hf-x1234567" / "previous" / "w.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(str(tmp_path / "hf")) as tmp:
            raise RuntimeError("the next write fails too")
    assert (tmp_path / "hf" / "w.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["hf"]
    with atomic_folder(str(tmp_path / "hf")) as tmp:
        open(os.path.join(tmp, "w.txt"), "w").write("new")
    assert (tmp_path / "hf" / "w.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["hf"]
    # the folder a sibling named hf-2 left aside is that sibling's: not put in hf's place, nor removed
    (tmp_path / ".distill-old-hf-2-abcdefgh" / "previous").mkdir(parents=True)
    with atomic_folder(str(tmp_path / "hf")) as tmp:
        pass
    assert sorted(os.listdir(tmp_path)) == [".distill-old-hf-2-abcdefgh", "hf"]


def test_full_disk_keeps_the_earlier_result(tmp_path, capsys, monkeypatch):
    p = recipe_with(tmp_path, GOOD)
    out = str(tmp_path / "run")
    assert main(["run", p, "--out", out]) == 0
    before = files(out)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("distill.io.save_file", full)
    code = main(["run", p, "--out", out, "--set", "distill.alpha=0.5", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write (No space left on device); free some disk space" in err, err
    after = files(out)
    for name in ("teacher.safetensors", "student.safetensors", "student_scratch.safetensors", "metrics.json"):
        path = os.path.join(out, name)
        assert after[path] == before[path], name  # the earlier result is intact
    assert not [f for f in after if f.endswith(".tmp")]


def test_models_are_measured_only_on_the_data_they_were_trained_beside(tmp_path, capsys):
    """After the run's CSV is edited, the test split holds other rows, some the saved models trained on:
    evaluate, compress, bench and export refuse in one line naming the model, the report leaves out its
    confusion matrices, and nothing is written. A setting that leaves the splits alone (the evaluation batch)
    passes."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rows = ["label," + ",".join(f"p{i}" for i in range(64))]
    rows += [f"{y}," + ",".join(str(int(v)) for v in x) for x, y in zip(digits.data[:300], digits.target[:300])]
    csv = tmp_path / "d.csv"
    csv.write_text("\n".join(rows) + "\n")
    p = recipe_with(tmp_path, TABULAR.replace("dataset: breast_cancer", f"dataset: csv, path: {csv}"))
    out = str(tmp_path / "run")
    assert main(["run", p, "--out", out]) == 0
    assert main(["compress", out, "--set", "compress.steps=[qat]"]) == 0
    assert main(["evaluate", out, "--set", "data.eval_batch_size=16", "--overwrite"]) == 0  # (the same splits)
    capsys.readouterr()
    csv.write_text("\n".join(rows[:1] + rows[101:] + rows[1:101]) + "\n")  # the same rows, in another order
    before = files(out)
    for args in (["evaluate", out], ["compress", out, "--set", "compress.steps=[qat]"], ["bench", out],
                 ["export", out, "--format", "safetensors"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert "trained on other data than the recipe gives now" in err and "distill run" in err, (args, err)
        assert len(err.splitlines()) == 1 and any(f"{os.path.join(out, m)}: " in err for m in ("teacher", "student"))
    assert files(out) == before
    assert main(["report", out, "--out", str(tmp_path / "r.html")]) == 0
    assert "trained on other data than the recipe gives now" in (tmp_path / "r.html").read_text()
    # trained again on the edited data, the run's models are measured; the compressed one, made before, is not
    assert main(["run", out]) == 0
    assert main(["bench", out, "--set", "bench.variants=[fp32]", "--set", "bench.latency_runs=3"]) == 0
    err = capsys.readouterr().err
    assert f"bench: {os.path.join(out, 'compress', 'qat')}: trained on other data" in err
    assert f"run `distill compress {out}` again (with its compress.steps)" in err and "; left out" in err
    rows = json.load(open(os.path.join(out, "bench", "bench.json")))["results"]
    assert {r["model"] for r in rows} == {"teacher", "student_scratch", "student"}


def test_a_model_made_for_another_recipe_is_not_evaluated_as_this_one(tmp_path, capsys):
    """A rerun that changes the recipe and stops before a stage leaves that stage's model of the old recipe
    beside the new recipe.yaml: evaluate refuses it, where it used to score it under the new recipe's key."""
    out, p = str(tmp_path / "run"), recipe_with(tmp_path, GOOD)
    assert main(["run", p, "--out", out]) == 0
    before = json.load(open(os.path.join(out, "stages.json")))
    from distill.io import load_meta  # (each epoch's accuracy is the stage's record, not the deployed file's)
    assert "val_history" in before["student"]
    assert "val_history" not in load_meta(os.path.join(out, "student.safetensors"))
    assert main(["run", p, "--out", out, "--overwrite", "--set", "student.train.epochs=2"]) == 0
    stages = json.load(open(os.path.join(out, "stages.json")))
    assert stages["teacher"]["fingerprint"] == before["teacher"]["fingerprint"]  # reused: the new recipe's now
    assert stages["teacher"]["recipe"] == stages["student"]["recipe"] != before["student"]["recipe"]
    stages["student_scratch"] = before["student_scratch"]  # (as a rerun stopped before the baseline leaves it)
    with open(os.path.join(out, "stages.json"), "w") as fh:
        json.dump(stages, fh)
    capsys.readouterr()
    assert main(["evaluate", out]) == 2
    err = capsys.readouterr().err
    assert "student_scratch.safetensors: made by a run of another recipe than" in err and "--resume" in err, err


def test_a_teacher_a_stage_command_builds_on_is_this_recipe_s(tmp_path, capsys):
    """train-student of a changed recipe on the folder's teacher adopts it: evaluate then measures it."""
    out, p = str(tmp_path / "run"), recipe_with(tmp_path, GOOD)
    assert main(["train-teacher", p, "--out", out]) == 0
    changed = str(tmp_path / "b.yaml")
    with open(changed, "w") as fh:
        fh.write(GOOD + "distill: {temperature: 3.0}\n")
    assert main(["train-student", changed, "--out", out, "--overwrite"]) == 0
    assert main(["evaluate", changed, "--out", out]) == 0, capsys.readouterr().err


def test_a_second_builder_of_the_same_thing_waits_for_the_first(tmp_path):
    """Two top-k cache builds of one entry at once: the second renamed the shared .partial folder away under
    the first (a traceback). Each build holds a lock on the entry; the second waits and finds it built."""
    import threading
    import time
    from distill.errors import UserError
    from distill.io import locked
    order, said = [], []

    def first():
        with locked(str(tmp_path / "e.lock")):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")
    t = threading.Thread(target=first)
    t.start()
    while not order:
        time.sleep(0.01)
    with locked(str(tmp_path / "e.lock"), said.append):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"] and "another process holds it; waiting" in said[0]
    # a cache folder that cannot be written: one line naming the lock file
    with pytest.raises(UserError, match=r"e.lock: cannot write in .*gone"):
        with locked(str(tmp_path / "gone" / "e.lock")):
            pass


def test_temp_folders_of_builds_killed_a_day_ago_are_swept(tmp_path):
    """(the GGUF conversion left one of a model's size per kill, and never swept them) Only distill's own: a
    recipe's output.cache_dir may be a folder of the user's, whose old .tmp-* folders are not distill's."""
    from distill.io import sweep_stale
    for name in (".distill-tmp-old", ".distill-tmp-live", "model", ".tmp-users"):
        (tmp_path / name).mkdir()
    for name in (".distill-tmp-old", ".tmp-users"):
        os.utime(tmp_path / name, (0, 0))
    sweep_stale(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".distill-tmp-live", ".tmp-users", "model"]


def test_a_writing_command_sweeps_the_temp_files_a_killed_one_left(tmp_path):
    """A SIGKILL mid-write left `.student.onnx.*.tmp` beside the file, and no later command removed it (the
    temp names were not distill's prefix). Under the folder's lock no other command writes there: a leftover
    over a minute old is removed; a younger one (doctor holds no lock) and the recovery copy of a folder stay."""
    from distill.io import atomic_path, folder_lock
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt), atomic_path(str(out / "export" / "student.onnx")) as tmp:
        raise KeyboardInterrupt  # (removed on an exception; a SIGKILL leaves it, as written below)
    assert os.path.basename(tmp).startswith(".distill-tmp-student.onnx.")
    leftover = out / "export" / os.path.basename(tmp)
    leftover.write_text("half an ONNX file")
    young, old_folder = out / ".distill-tmp-doctor.json.x.tmp", out / ".distill-tmp-abc"
    aside = out / ".distill-old-teacher-abcdefgh"
    young.write_text("{}")
    (old_folder / "inner").mkdir(parents=True)
    aside.mkdir()
    long_ago = time.time() - 3600
    for path in (leftover, old_folder):
        os.utime(path, (long_ago, long_ago))
    with folder_lock(str(out)):
        pass
    assert not os.path.exists(leftover) and not old_folder.exists()
    assert young.exists() and aside.exists()


def test_a_second_command_in_a_run_folder_is_refused_until_the_first_ends(tmp_path, capsys):
    """Two commands writing in one run folder at once mixed their files (a `run --overwrite` beside a
    `compress`). The first holds the folder; the second is refused in one line naming its process, before it
    writes anything; a killed holder leaves the folder free."""
    import signal
    import subprocess
    import sys
    from distill.io import folder_lock, folder_lock_path
    out = str(tmp_path / "run")
    with folder_lock(out):
        for argv in (["run", "--out", out], ["compress", out], ["bench", out], ["report", out],
                     ["search", "--grid", "distill.temperature=2,4", "--out", out]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"error: {out}: another distill command (process {os.getpid()}) is writing in this " \
                          f"folder; wait for it to end, or use another folder", argv
        assert not os.path.exists(out)
    seed = os.path.join(out, "seed_1")  # (a --seeds run holds each seed's folder too: a stage command names one)
    with folder_lock(seed):
        assert main(["run", "--out", out, "--seeds", "2"]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {seed}: another distill command (process ")
        assert not os.path.exists(out)
        assert main(["doctor", out]) == 2  # (doctor only reads, and writes its own doctor.json: not locked)
        assert "not a run folder" in capsys.readouterr().err
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from distill.io import folder_lock\n"
                               f"with folder_lock({out!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", "--out", out]) == 2 and f"(process {holder.pid})" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(out):  # (free again, the killed holder's file taken over)
        assert os.path.isfile(folder_lock_path(out))
    assert not os.path.exists(folder_lock_path(out))  # (removed at the end: none pile up)


def test_the_stage_functions_given_a_recipe_say_they_take_a_run_folder():
    """(exported beside run(); given a Recipe each was an AttributeError)"""
    import distill
    from distill.errors import UserError
    recipe = distill.Recipe.load("digits")
    for name in ("train_teacher", "soft_labels", "train_student"):
        with pytest.raises(UserError, match=rf"^{name}: expected a RunDir \(RunDir\(recipe, out\)\), got Recipe"):
            getattr(distill, name)(recipe)
    assert set(distill.__all__) <= set(dir(distill))  # (the lazy exports: tab completion offered none)


def test_an_unfinished_compressed_model_names_the_command_that_finishes_it(tmp_path):
    """bench told a killed compress's step to `distill run RUN --resume`, which never makes it: the same line
    came back after it. The command that makes the model finishes it."""
    from distill.errors import UserError
    from distill.pipeline.rundir import UNFINISHED, require_current
    (tmp_path / "stages.json").write_text(json.dumps({"compress/channels": {"fingerprint": UNFINISHED},
                                                      "student": {"fingerprint": UNFINISHED}}))
    for name, again in (("compress/channels", "compress"), ("student", "run")):
        with pytest.raises(UserError, match=f"finish the run first \\(bench needs it\\): distill {again} "
                                            f"{tmp_path} --resume$"):
            require_current(str(tmp_path), name, str(tmp_path / name), "bench")


def test_a_suggested_command_quotes_a_folder_with_a_space(tmp_path):
    """`continue with: distill run /tmp/int run --resume`, pasted, was `unrecognized arguments: run`."""
    import shlex
    from distill.pipeline.artifacts import finish_command
    folder = str(tmp_path / "int run")
    assert shlex.split(finish_command(folder)) == ["distill", "run", folder]
