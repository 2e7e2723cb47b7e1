"""Datasets as in-memory tensors: embedded scikit-learn sets and image arrays from `.npz`.

Every loader returns raw arrays with a train/test split; `load_data` then carves a stratified
validation split out of train, normalises with statistics of the remaining train part only, and
fingerprints the result so that caches (soft labels, stage outputs) notice any change.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np
import torch

from ..errors import UserError, did_you_mean
from ..io import MAX_INPUT_VALUES, sha256_file
from ..registry import DATASETS

T = TypeVar("T")


@dataclass
class Raw:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: Optional[np.ndarray] = None  # None: carve a stratified test split
    y_test: Optional[np.ndarray] = None
    class_names: Optional[List[str]] = None
    image: bool = False  # (N, C, H, W) images rather than feature vectors
    pad_id: Optional[int] = None  # token ids (text) rather than numbers: padded with this id


@dataclass
class DataBundle:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: List[str]
    input_shape: Tuple[int, ...]
    image: bool
    fingerprint: str
    stats: Dict[str, Any] = field(default_factory=dict)
    pad_id: Optional[int] = None  # text: x holds token ids padded with this id
    x_unlabelled: Optional[torch.Tensor] = None  # data.label_fraction < 1: training inputs without their labels
    task: str = "classification"  # the task of the registry that trains on it (causal_lm: next tokens)
    tokenizer: Optional[str] = None  # completions: the tokenizer (folder or GGUF) that made the token ids
    # which rows the data holds, and which are its test rows, whatever the split or order (see rows_digest):
    # a saved model carries them, so that one loaded for another split of the same data is told apart
    rows: Dict[str, str] = field(default_factory=dict)
    train_rows: Optional[int] = None  # the training rows (validation's and unlabelled included) before train_subset

    def probe(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A fixed set of n inputs and labels to measure a model on while it trains: the first validation
        samples (a shuffled split), or without one a fixed sample of the training ones (a file's own order
        may be sorted by class)."""
        if len(self.y_val):
            return self.x_val[:n], self.y_val[:n]
        pick = self.training_sample(n)
        return self.x_train[pick], self.y_train[pick]

    def training_sample(self, n: int) -> torch.Tensor:
        """Indices of n training samples drawn at random with a fixed seed, in order: the same every time, and
        not the first n of a file sorted by class (what static int8 calibrates on, what head importance reads)."""
        pick = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(0))[:n]
        return pick.sort().values

    @cached_property
    def split_fingerprint(self) -> str:
        """Hash of which rows are in which split: the arrays alone, not the settings that batch, sample or
        augment them (`fingerprint` has those). A model is measured only on the splits it was trained beside."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test, self.x_unlabelled):
            if t is not None:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().reshape(-1))  # (its bytes, with no copy of the array)
        return h.hexdigest()[:16]

    @property
    def variable_length(self) -> bool:
        """Token ids padded per batch (text): features and outputs vary in length from batch to batch."""
        return self.pad_id is not None

    @property
    def lengths(self) -> Optional[torch.Tensor]:
        """Real (unpadded) length of each training text; None for non-text data. For a language model the
        real part ends at the last position with a target (the pad id may also be its EOS)."""
        if self.pad_id is None:
            return None
        if self.task == "causal_lm":
            return last_target(self.y_train)
        return (self.x_train != self.pad_id).sum(1)


def last_target(y: torch.Tensor) -> torch.Tensor:
    """Per row of next-token targets, 1 + the last position with a target (-100: none), i.e. its real length."""
    at = torch.arange(1, y.shape[1] + 1).expand_as(y)
    return torch.where(y >= 0, at, torch.zeros_like(at)).max(1).values


@DATASETS.register("digits")
def _digits(cfg: Dict[str, Any]) -> Raw:
    from sklearn.datasets import load_digits
    d = load_digits()
    if cfg["as_image"]:
        return Raw(d.images.astype(np.float32)[:, None] / 16.0, d.target, image=True,
                   class_names=[str(c) for c in d.target_names])
    return Raw(d.data.astype(np.float32) / 16.0, d.target, class_names=[str(c) for c in d.target_names])


@DATASETS.register("breast_cancer")
def _breast_cancer(cfg: Dict[str, Any]) -> Raw:
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    return Raw(d.data.astype(np.float32), d.target, class_names=[str(c) for c in d.target_names])


@DATASETS.register("npz")
def _npz(cfg: Dict[str, Any]) -> Raw:
    path = cfg["path"]
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # (no NumPy format is tried as a pickle)
        why = "neither a zip of arrays nor a NumPy file" if "pickle" in str(e) or isinstance(e, EOFError) else \
            "truncated or not a zip" if isinstance(e, zipfile.BadZipFile) else e
        raise UserError(f"{path}: cannot read as .npz ({why})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: one array (an .npy file), not an .npz of x_train, y_train, x_test, y_test")
    try:
        with z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise UserError(f"{path}: missing arrays {missing}; an .npz needs x_train, y_train, x_test, y_test")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # (a member cut short by truncation)
        raise UserError(f"{path}: cannot read as .npz ({e})") from None
    other = arrays["x_test" if arrays["x_train"].dtype == np.uint8 else "x_train"]
    if (arrays["x_train"].dtype == np.uint8) != (arrays["x_test"].dtype == np.uint8) and other.size \
            and float(np.nanmax(np.abs(other))) > 1.5:  # (uint8 is read as /255: the other split is on 0..255)
        raise UserError(f"{path}: x_train is {arrays['x_train'].dtype} and x_test {arrays['x_test'].dtype}; uint8 "
                        f"pixels are scaled to [0, 1] and other types are read as they are, so give both one type")
    x_train, x_test = _as_nchw(arrays["x_train"], path), _as_nchw(arrays["x_test"], path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"{path}: x_test's samples are shaped {x_test.shape[1:]} and x_train's {x_train.shape[1:]}; "
                        f"the models take one input shape")
    return Raw(x_train, arrays["y_train"], x_test, arrays["y_test"], image=True)


@DATASETS.register("csv")
def _csv(cfg: Dict[str, Any]) -> Raw:
    """Tabular CSV with a header: `label_column` holds the class (names or integers), every other column a
    number. A `test_path` CSV is the test split; without one a stratified test split is carved out."""
    names, x, y = _read_csv(cfg["path"], cfg["label_column"])
    if cfg["test_path"]:
        test_names, xt, yt = _read_csv(cfg["test_path"], cfg["label_column"])
        if test_names != names:
            raise UserError(f"{cfg['test_path']}: columns {test_names} differ from {cfg['path']}'s {names}")
    classes = sorted(set(y) | (set(yt) if cfg["test_path"] else set()), key=_class_order)
    index = {c: i for i, c in enumerate(classes)}
    return Raw(x, np.array([index[v] for v in y]), xt if cfg["test_path"] else None,
               np.array([index[v] for v in yt]) if cfg["test_path"] else None, class_names=classes)


def _class_order(name: str) -> tuple:
    """Integer labels in numeric order (2 before 10), names alphabetically."""
    # (ties of value, "1" and "01", in text order: the same order in every process, whatever the set's)
    return (0, int(name), name) if re.fullmatch(r"-?[0-9]+", name) else (1, 0, name)


def read_text_file(path: str, parse: Callable[[Any], T]) -> T:
    """`parse(fh)` on the UTF-8 file `path`; an unreadable or non-UTF-8 file is a one-line error."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # (a long document, not 128 K characters)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # (-sig: a byte-order mark is not text)
            return parse(fh)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except csv.Error as e:  # (a field over the limit: an unclosed quote that runs to the end)
        raise UserError(f"{path}: not readable as CSV ({e})") from None


def _numbered(fh) -> List[Tuple[int, List[str]]]:
    """(line number, fields) of each non-blank CSV row, for errors that say where."""
    reader = csv.reader(fh)
    return [(reader.line_num, row) for row in reader if row]


def _read_csv(path: str, label: str) -> tuple:
    rows = read_text_file(path, _numbered)
    if not rows:
        raise UserError(f"{path}: empty file; a CSV needs a header row and data rows")
    header, body = rows[0][1], rows[1:]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice or "" in (h.strip() for h in header):
        what = f"names {twice} more than once" if twice else "has a column with no name"
        raise UserError(f"{path}: the header {what}; every column needs its own name (a second label column "
                        f"would become a feature)")
    if label not in header:
        raise UserError(f"{path}: no column named '{label}' (data.label_column){did_you_mean(label, header)}; "
                        f"columns: {', '.join(header)}")
    li = header.index(label)
    features = [h for i, h in enumerate(header) if i != li]
    if not features:
        raise UserError(f"{path}: the label column is its only column; the features are the other columns")
    x = np.zeros((len(body), len(features)), np.float32)
    for r, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise UserError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}")
        if not row[li].strip():  # (else '' would silently be a class of its own)
            raise UserError(f"{path}: line {line}: empty '{label}' (data.label_column); every row needs its class")
        for c, value in enumerate(v for i, v in enumerate(row) if i != li):
            try:
                x[r, c] = float(value)
            except ValueError:
                raise UserError(f"{path}: line {line}, column '{features[c]}': {value!r} is not a number") from None
    return header, x, [row[li].strip() for _, row in body]


def _as_nchw(x: np.ndarray, path: str) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); channels-last (N,H,W,C) with C in 1..4, or more of them beside square images,
    -> (N,C,H,W); else channels-first; uint8 -> [0, 1]. Where both the second and the last side are 4 or less,
    either layout could be meant: the one whose images are square is taken, and if both or neither are, the
    file is refused rather than guessed."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] <= 4 and x.shape[-1] <= 4:
        first, last = x.shape[2] == x.shape[3], x.shape[1] == x.shape[2]
        if first == last:
            raise UserError(f"{path}: images of shape {x.shape[1:]} could be channels-first (N,C,H,W) or "
                            f"channels-last (N,H,W,C); store them with image sides larger than 4")
        if last:
            x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4 and (x.shape[-1] <= 4 or x.shape[1] == x.shape[2] != x.shape[3]):
        x = x.transpose(0, 3, 1, 2)  # (channels last: 1 to 4 of them, or more beside square images: 8 bands)
    elif x.ndim != 4:
        raise UserError(f"{path}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {x.shape}")
    x = np.ascontiguousarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _split(x: np.ndarray, y: np.ndarray, cfg: Dict[str, Any], key: str, names: Optional[List[str]] = None,
           aside_needs_every_class: bool = True, **size: Any):
    """A stratified split that keeps every class on the training side (the first); too few rows for that is one
    clear error naming the key. (scikit-learn's stratified split may leave a rare class out of a small side:
    1 in 200 labelled rows of TREC kept no ABBR question.) The other side needs every class too where it is
    scored (test, validation); rows set aside (a subset's rest, the unlabelled ones) may be too few for that,
    and are then drawn without strata (train_subset=1430 of 1,437 digits)."""
    from sklearn.model_selection import train_test_split
    try:
        parts = train_test_split(x, y, stratify=y, random_state=cfg["split_seed"], **size)
    except ValueError as e:
        if not aside_needs_every_class:
            parts = train_test_split(x, y, random_state=cfg["split_seed"], **size)
        else:
            raise UserError(f"data.{key}={cfg[key]}: cannot split {len(y)} rows with every class on both sides "
                            f"({e}); use more rows or another data.{key}") from None
    missing = sorted(set(np.unique(y).tolist()) - set(np.unique(parts[2]).tolist()))
    if missing:
        shown = [names[i] if names and i < len(names) else i for i in missing[:5]]
        raise UserError(f"data.{key}={cfg[key]}: keeps {len(parts[2]):,} training rows, none of class"
                        f"{'es' if len(missing) > 1 else ''} {', '.join(map(str, shown))}; use more rows or "
                        f"another data.{key}")
    return parts


def _same_bytes(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two files hold the same bytes (read in full only when their sizes are equal)."""
    return bool(a and b) and os.path.isfile(a) and os.path.isfile(b) and \
        os.path.getsize(a) == os.path.getsize(b) and sha256_file(a) == sha256_file(b)


# datasets that make their DataBundle themselves (registered by their modules: data/lm.py)
BUNDLES: Dict[str, Callable[[Dict[str, Any]], DataBundle]] = {}


def load_data(cfg: Dict[str, Any]) -> DataBundle:
    """The `data` section of a resolved recipe -> normalised train/val/test tensors."""
    if cfg["dataset"] in BUNDLES:  # data that is not labelled samples (text_lm: next-token windows of a text)
        return BUNDLES[cfg["dataset"]](cfg)
    if _same_bytes(cfg.get("path"), cfg.get("test_path")):  # (scores measured on training rows)
        raise UserError(f"data.test_path: {cfg['test_path']} holds the same rows as data.path ({cfg['path']}); "
                        f"give a test file the models do not train on, or none (data.test_fraction splits one off)")
    raw = DATASETS.get(cfg["dataset"], "data.dataset")(cfg)
    _check_inputs(raw.x_train, raw.y_train, "train", cfg)
    values = math.prod(raw.x_train.shape[1:])
    if values > MAX_INPUT_VALUES:  # (a saved model's header declaring it would be refused: see io._checked_meta)
        raise UserError(f"{cfg['path'] or cfg['dataset']}: inputs of shape {tuple(raw.x_train.shape[1:])} hold "
                        f"{values:,} values each, over the {MAX_INPUT_VALUES:,} distill reads; resize them")
    if raw.x_test is not None:
        _check_inputs(raw.x_test, raw.y_test, "test", cfg)
    y_all = _as_labels(raw.y_train, cfg, "y_train")
    names = raw.class_names
    if raw.x_test is None:
        x_tr, x_te, y_tr, y_te = _split(raw.x_train, y_all, cfg, "test_fraction", names,
                                        test_size=cfg["test_fraction"])
    else:
        x_tr, y_tr, x_te, y_te = raw.x_train, y_all, raw.x_test, _as_labels(raw.y_test, cfg, "y_test")
    train_rows = len(y_tr)
    if cfg["train_subset"] and cfg["train_subset"] < len(y_tr):  # (of the training rows: the test split stays whole)
        x_tr, _, y_tr, _ = _split(x_tr, y_tr, cfg, "train_subset", names, aside_needs_every_class=False,
                                  train_size=cfg["train_subset"])
    num_classes = _check_labels(y_tr, y_te, cfg, raw.class_names)
    if cfg["val_fraction"]:
        x_tr, x_va, y_tr, y_va = _split(x_tr, y_tr, cfg, "val_fraction", names, test_size=cfg["val_fraction"])
    else:  # no validation split: every training row trains (the last epoch is kept)
        x_va, y_va = x_tr[:0], y_tr[:0]
    x_un = x_tr[:0]
    if cfg["label_fraction"] < 1:  # the rest of the training inputs lose their labels
        x_tr, x_un, y_tr, _ = _split(x_tr, y_tr, cfg, "label_fraction", names, aside_needs_every_class=False,
                                     train_size=cfg["label_fraction"])
    # (every row of the source, before any split or subset, and the test rows; before normalisation)
    rows = {"all": rows_digest(raw.x_train, *([] if raw.x_test is None else [raw.x_test])), "test": rows_digest(x_te)}
    stats: Dict[str, Any] = {}
    if cfg["transforms"]["normalize"] and raw.pad_id is None:  # token ids are never normalised
        axes = (0, 2, 3) if raw.image else (0,)
        inputs = np.concatenate([x_tr, x_un])  # every training input (labelled or not); no label is used
        mean = inputs.mean(axis=axes, keepdims=True)
        std = inputs.std(axis=axes, keepdims=True)
        # a feature constant in training (a border pixel always 0) is only centred: dividing by a tiny std
        # would turn its rare non-zero test values into outliers of 1e4 and more (as StandardScaler does)
        std = np.where(std > 1e-6, std + 1e-6, 1.0)
        x_tr, x_va, x_te, x_un = [(a - mean) / std for a in (x_tr, x_va, x_te, x_un)]
        stats = {"mean": mean.reshape(-1).tolist(), "std": std.reshape(-1).tolist()}
    dtype = np.float32 if raw.pad_id is None else np.int64
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)) for a in (x_tr, x_va, x_te, x_un)]
    labels = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (y_tr, y_va, y_te)]
    names = raw.class_names or [str(i) for i in range(num_classes)]
    return DataBundle(tensors[0], labels[0], tensors[1], labels[1], tensors[2], labels[2], num_classes,
                      names, tuple(tensors[0].shape[1:]), raw.image, _fingerprint(cfg, tensors, labels), stats,
                      raw.pad_id, tensors[3] if len(tensors[3]) else None, rows=rows, train_rows=train_rows)


def rows_digest(*arrays: np.ndarray) -> str:
    """A hash of the set of rows in `arrays`, whatever their order and whichever array holds each: the same for
    two splits of one data set, while their test rows' differ."""
    rows = sorted(hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=8).digest()
                  for a in arrays for r in a)
    return hashlib.sha256(b"".join(rows)).hexdigest()[:16]


def with_training_split(data: DataBundle, x: torch.Tensor, y: torch.Tensor) -> DataBundle:
    """`data` training on `x`, `y` instead (teacher-written sequences), fingerprinted by their content: caches
    keyed by the fingerprint (the teacher's soft labels) must not be shared by two different texts written
    with the same settings, say by two seeds."""
    h = hashlib.sha256(data.fingerprint.encode())
    for t in (x, y):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return replace(data, x_train=x, y_train=y, fingerprint=h.hexdigest()[:16])


def with_teacher_labelled(data: DataBundle, extra: torch.Tensor) -> DataBundle:
    """`data` with the inputs `extra` appended to its training split with label -1: no hard label, the
    teacher's outputs are their only target (the cross-entropy leaves them out)."""
    h = hashlib.sha256(data.fingerprint.encode())
    h.update(extra.numpy().tobytes())
    return replace(data, x_train=torch.cat([data.x_train, extra]),
                   y_train=torch.cat([data.y_train, torch.full((len(extra),), -1)]),
                   x_unlabelled=None, fingerprint=h.hexdigest()[:16])


def _as_labels(y: np.ndarray, cfg: Dict[str, Any], name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or
                           (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
        raise UserError(f"{cfg['path'] or cfg['dataset']}: {name} must be a 1-D array of whole class indices, "
                        f"got dtype {y.dtype}, shape {y.shape}")
    return y.astype(np.int64)


def _check_labels(y_tr: np.ndarray, y_te: np.ndarray, cfg: Dict[str, Any], names: Optional[List[str]] = None
                  ) -> int:
    """Labels are class indices 0..K-1 with at least two classes; returns K."""
    where = cfg["path"] or cfg["dataset"]
    for name, y in (("y_train", y_tr), ("y_test", y_te)):
        if len(y) == 0:
            raise UserError(f"{where}: {name} is empty")
        if y.min() < 0:
            raise UserError(f"{where}: {name} has negative label {y.min()}; labels must be class indices 0..K-1")
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    present = np.unique(np.concatenate([y_tr, y_te]))  # (sorted)
    if len(present) < num_classes:  # (a label id of 10**9 would otherwise make a billion classes)
        first = next(i for i, c in enumerate(present.tolist() + [num_classes]) if c != i)
        raise UserError(f"{where}: {num_classes - len(present):,} class indices below the largest label "
                        f"{num_classes - 1} never occur (the first: {first}); labels must be class indices 0..K-1: "
                        f"number the classes consecutively")
    if len(np.unique(y_tr)) < 2:
        raise UserError(f"{where}: y_train holds a single class ({y_tr[0]}); classification needs at least two")
    unseen = sorted(set(np.unique(y_te).tolist()) - set(np.unique(y_tr).tolist()))
    if unseen:
        shown = [names[i] for i in unseen[:5]] if names and max(unseen) < len(names) else unseen[:5]
        raise UserError(f"{cfg.get('test_path') or where}: y_test has labels {shown} that never occur in y_train; "
                        f"labels must be class indices 0..K-1 shared by both splits")
    return num_classes


def _check_inputs(x: np.ndarray, y: np.ndarray, name: str, cfg: Dict[str, Any]) -> None:
    where = cfg["path"] or cfg["dataset"]
    if len(x) != len(y):
        raise UserError(f"{where}: x_{name} has {len(x)} samples but y_{name} has {len(y)}")
    bad = int(np.size(x) - np.isfinite(x).sum())
    if bad:
        raise UserError(f"{where}: x_{name} holds {bad} NaN or Inf values; clean or impute them before training")


def _fingerprint(cfg: Dict[str, Any], tensors: List[torch.Tensor], labels: List[torch.Tensor]) -> str:
    """Hash of the preprocessed arrays and the preprocessing settings (augmentation included)."""
    kept = {k: v for k, v in cfg.items() if k not in ("workers", "eval_batch_size")}
    if kept.get("label_fraction") == 1:  # (the default: runs made before the key existed keep their caches)
        del kept["label_fraction"]
    h = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    for t in tensors + labels:
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
