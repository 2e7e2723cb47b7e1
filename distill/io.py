"""Files: every artifact is written to a temp file in the same folder, fsynced, then renamed into place,
so a crash never leaves a half-written file and never destroys the previous good one."""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError

# The prefix of distill's temp folders: only these are swept (a cache folder a recipe names may be anyone's)
TMP_PREFIX = ".distill-tmp-"

_UMASK = os.umask(0o022)  # (read by setting it: there is no other way; restored at once)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temp path beside `path`; on success it replaces `path`, on failure it is removed. A device,
    pipe or folder is refused, as the rename would put a plain file in its place (`--out /dev/null` run as
    root). A symbolic link is replaced, not written through (a run folder's files may link to another run's;
    a user's --out is resolved by the command: `out_path`)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{path}: not a regular file; give the path of a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    # (the mode a plain open would give, or the mode of the file it replaces: a 0600 file stays 0600)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.isfile(path) else 0o666 & ~_UMASK
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(fd)  # (0600 while it is written: a read-only file replaced stays writable until it is whole)
    except OSError as e:
        raise UserError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # (mkstemp and a writer that makes the file anew, as safetensors does, leave 0600)
        os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:  # disk full, read-only or vanished folder: the earlier
        if isinstance(e, RuntimeError) and not _write_failed(e):  # `path` is left as it was
            raise
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__
        why = text.splitlines()[0]
        raise UserError(f"{path}: cannot write ({why}){'; free some disk space' if full else ''}; "
                        f"the previous version of the file, if any, is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_failed(e: RuntimeError) -> bool:
    """torch.save's writer failing on the disk (it raises RuntimeError, not OSError)."""
    return any(k in str(e) for k in ("PytorchStreamWriter", "unexpected pos", "file write failed"))


def out_path(path: str) -> str:
    """A user's --out: `~` read as a shell reads it (`--out=~/x` reaches here as it is), and a symbolic link
    written through (its target replaced, the link kept)."""
    path = os.path.expanduser(path)
    return os.path.realpath(path) if os.path.islink(path) else path


@contextmanager
def atomic_folder(folder: str) -> Iterator[str]:
    """`atomic_path` for a folder: yields a temp folder beside `folder`, which replaces `folder` on success
    and is removed on failure. An earlier `folder` is moved aside first and removed only after the rename: a
    crash between the two renames leaves it aside (`.distill-old-<name>-*/previous`), and the next write of
    `folder` puts it back first, so that a failure then still leaves the old folder."""
    parent = os.path.dirname(os.path.abspath(folder))
    aside = f".distill-old-{os.path.basename(os.path.abspath(folder))}-"
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        for name in sorted(os.listdir(parent)):  # (a crash between the renames of an earlier write)
            # (mkdtemp's suffix is 8 of [a-z0-9_]: a sibling folder named <name>-x has its own)
            if re.fullmatch(re.escape(aside) + r"[a-z0-9_]{8}", name) and \
                    os.path.isdir(os.path.join(parent, name, "previous")):
                if not os.path.exists(folder):
                    os.rename(os.path.join(parent, name, "previous"), folder)
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
        yield tmp
        _plain_modes(tmp)
        old = tempfile.mkdtemp(prefix=aside, dir=parent) if os.path.isdir(folder) else None
        if old:
            os.rename(folder, os.path.join(old, "previous"))
        os.rename(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the folder ({e.strerror or e})") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_stale(folder: str, age_s: float = 24 * 3600, depth: int = 1) -> None:
    """Remove the temp files and folders (TMP_PREFIX*, distill's own only) that processes killed mid-write left
    in `folder`, and in its subfolders down to `depth` levels in all, `age_s` ago or more (a live write's is
    younger)."""
    now, top = time.time(), os.path.abspath(folder).count(os.sep)
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            path = os.path.join(root, name)
            try:
                if name.startswith(TMP_PREFIX) and now - os.path.getmtime(path) > age_s:
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            except OSError:
                pass  # (gone already, or not ours to remove: it stays)
        deeper = os.path.abspath(root).count(os.sep) - top + 1 < depth
        dirs[:] = [d for d in dirs if deeper and not d.startswith(TMP_PREFIX)]


@contextmanager
def locked(path: str, echo: Any = None) -> Iterator[None]:
    """An exclusive lock on the file `path` (made if absent) while the block runs: another process building the
    same thing waits (saying so with `echo`) and then finds it built."""
    import fcntl
    try:
        fh = open(path, "a")
    except OSError as e:
        raise UserError(f"{path}: cannot write in {os.path.dirname(os.path.abspath(path))} ({e.strerror or e})") \
            from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if echo:
                echo(f"{path}: another process holds it; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # (closing releases the lock)


@contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """One distill command at a time writes in `folder`: a second one is refused in one line instead of mixing
    its files with the first's. The lock is a file outside the folder (in the temp folder, named by the
    folder's real path), so that nothing is written in it before the command checked its inputs; the kernel
    releases it when the holder dies, and the holder removes it at the end."""
    import fcntl
    path = folder_lock_path(folder)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise UserError(f"{folder}: another distill command{f' (process {holder})' if holder else ''} is "
                            f"writing in this folder; wait for it to end, or use another folder") from None
        try:  # (the holder before us may have removed the file after we opened it: lock the one at `path`)
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    try:
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        # (what a command killed mid-write left anywhere in the run, 4 levels down at most: checkpoints/<stage>/,
        # compress/<step>/; no other command writes here now, but doctor, which holds no lock: a minute's grace)
        sweep_stale(folder, age_s=60.0, depth=4)
        yield
    finally:
        try:
            os.remove(path)  # (while still held: a command that opened it now finds it removed and retries)
        finally:
            fh.close()


def folder_lock_path(folder: str) -> str:
    locks = os.path.join(tempfile.gettempdir(), f"distill-locks-{os.getuid()}")
    return os.path.join(locks, hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:32] + ".lock")


def _plain_modes(folder: str) -> None:
    """The modes a plain mkdir and open give, for a folder mkdtemp made 0700 and files written 0600 (safetensors):
    a model folder another user's server reads."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~_UMASK)
        for n in names:
            os.chmod(os.path.join(root, n), 0o666 & ~_UMASK)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def save_figure(fig: Any, path: str) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str, default: Any = None) -> Any:
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_run_json(path: str, default: Any = None) -> Any:
    """`read_json` for a file a command wrote into a run folder (each holds a JSON object): unreadable JSON,
    or another value than an object, is one clear line."""
    if not os.path.isfile(path):
        return default
    try:
        value = read_json(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); re-create it with the command that wrote it") from None
    if not isinstance(value, dict):  # (`null` too: it is not "no file")
        raise UserError(f"{path}: holds {type(value).__name__}, not a JSON object; re-create it with the command "
                        f"that wrote it")
    return value


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    """One line per record; a line is written whole by a single write call."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def save_model(model: nn.Module, path: str, meta: Dict[str, Any]) -> None:
    """Weights as safetensors; `meta` (model spec, input shape, classes) as JSON in the header."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"distill": json.dumps(meta)})


def _not_safetensors(path: str, e: Exception) -> UserError:
    """Explain pickle-based files instead of loading them: unpickling can run arbitrary code."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        head = b""
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return UserError(f"{path}: a pickle-based PyTorch file; distill loads only .safetensors, because "
                         f"unpickling can run code (convert it with safetensors.torch.save_file)")
    return UserError(f"{path}: not a readable safetensors file, truncated or corrupt "
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def load_meta(path: str) -> Dict[str, Any]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _not_safetensors(path, e) from None
    try:
        out = json.loads(meta["distill"]) if "distill" in meta else {}
    except ValueError:
        raise UserError(f"{path}: the distill metadata in the header is not valid JSON") from None
    return _checked_meta(path, out)


# The header fields distill reads, and what each must be (a file written elsewhere, or edited, is refused in
# one line rather than failing deep in the loading code).
_META_KINDS = {"spec": dict, "input_shape": list, "num_classes": int, "class_names": list, "preprocessing": dict,
               "rows": dict}


def _checked_meta(path: str, meta: Any) -> Dict[str, Any]:
    if not isinstance(meta, dict):
        raise UserError(f"{path}: the distill metadata in the header is {type(meta).__name__}, not a mapping; "
                        f"was the file written by distill?")
    for key, kind in _META_KINDS.items():
        v = meta.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            article = "an" if kind is int else "a"
            raise UserError(f"{path}: the header's {key} is {v!r:.60}, not {article} {kind.__name__}; was the file "
                            f"written by distill?")
    shape = meta.get("input_shape")
    if shape is not None and not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise UserError(f"{path}: the header's input_shape {shape!r:.60} is not a list of positive sizes")
    # (a model built for a larger input, and its check on two of them, would ask the allocator for all there is)
    if shape and math.prod(shape) > MAX_INPUT_VALUES:
        raise UserError(f"{path}: the header's input_shape {shape!r:.60} is over {MAX_INPUT_VALUES:,} values an "
                        f"input; was the file written by distill?")
    _check_inner(path, meta)
    return meta


MAX_INPUT_VALUES = 1 << 24  # values of one input (3 x 2364 x 2364 images), in data and in model headers


def _check_inner(path: str, meta: Dict[str, Any]) -> None:
    """The header's nested fields that code indexes: what they must be, else one line (not a TypeError)."""
    spec, norm, structure = meta.get("spec") or {}, (meta.get("preprocessing") or {}).get("normalize"), \
        meta.get("structure")
    numbers = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    fields = [("spec.model", spec.get("model"), lambda v: v is None or isinstance(v, str)),
              ("spec.args", spec.get("args"), lambda v: v is None or isinstance(v, dict)),
              ("preprocessing.normalize", norm, lambda v: not v or (isinstance(v, dict) and numbers(v.get("mean"))
                                                                    and numbers(v.get("std"))
                                                                    and len(v["mean"]) == len(v["std"]))),
              ("structure", structure, lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("drop"), list)
                                                               and all(isinstance(d, str) for d in v["drop"])))]
    for what, value, ok in fields:
        if not ok(value):
            raise UserError(f"{path}: the header's {what} is {value!r:.60}, not what distill writes; was the file "
                            f"written by distill?")


def load_weights(model: nn.Module, path: str, where: str) -> None:
    """Load safetensors weights into `model`; a file for another architecture is a clear error."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{where}: {_not_safetensors(path, e)}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model has {tuple(own[wrong[0]].shape)}")
        raise UserError(f"{where}: {path} holds weights of another architecture ({detail})")
    model.load_state_dict(state)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(path: str) -> str:
    """The content hash of a model file, or of a model folder (its files, by name; not its subfolders, such as
    a trainer's checkpoint-*/ or a run made inside it, which the loader does not read): what a stage loaded
    from there. Remembered per (path, names, sizes, modification times): hashed once a command."""
    try:
        if os.path.isfile(path):
            st = os.stat(path)
            return _files_sha256(path, ((os.path.basename(path), st.st_size, st.st_mtime_ns),))
        names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))  # (not a dangling link)
        stats = [os.stat(os.path.join(path, n)) for n in names]
        return _files_sha256(path, tuple((n, st.st_size, st.st_mtime_ns) for n, st in zip(names, stats)))
    except OSError as e:
        raise UserError(f"{getattr(e, 'filename', None) or path}: cannot read ({e.strerror or e})") from None


@functools.lru_cache(maxsize=64)
def _files_sha256(path: str, listing: tuple) -> str:
    if os.path.isfile(path):
        return sha256_file(path)
    return sha256_json([[name, sha256_file(os.path.join(path, name))] for name, _, _ in listing])


def weights_sha256(model: nn.Module) -> str:
    """Hash of the weights alone (names, shapes, values): unlike the file, blind to metadata such as train time."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def model_sha256(model: nn.Module) -> str:
    """The weights and the modules that compute with them: the weights alone do not tell ReLU from Tanh
    between the same Linear layers, and what was made from one (a cache entry, a student) was reused for the
    other."""
    return weights_sha256(model) + sha256_json(repr(model))[:16]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
