"""`distill export RUN_DIR`: one model of a finished run written for deployment, checked, and recorded in
export/exports.json. The model must be current (finished, of the folder's recipe; a compressed one of the last,
up-to-date chain), and the file is verified on the run's own test inputs (see `export.export_model`)."""
from __future__ import annotations

import os
import re
import shlex
from typing import Any, Dict, Optional

from ..errors import UserError
from ..roles import SCRATCH, STUDENT, TEACHER

MODEL_NAMES = (STUDENT, SCRATCH, TEACHER)


def export_run_model(recipe, folder: str, name: str, fmt: str, out: Optional[str], preprocessing: bool) -> str:
    """Write `name` of the run in `folder` as `fmt` (to `out`, or export/ in the folder); return what was done."""
    from ..io import read_run_json
    from ..pipeline.artifacts import require_saved
    from ..pipeline.rundir import require_current
    record = os.path.join(folder, "export", "exports.json")
    exports = read_run_json(record, {})  # (read first: a corrupt record is refused before anything is written)
    if name not in MODEL_NAMES and not re.fullmatch(r"compress/\w[\w.-]*", name):
        raise UserError(f"--model {name}: choose student, student_scratch, teacher or compress/NAME")
    path = require_saved(folder, name)
    if name.startswith("compress/"):  # (first: after a finished retrain of its source, that is the reason, not
        from .bench import compressed_out_of_date  # a run that stopped before making this model again)
        _compress_again(folder, name, compressed_out_of_date(folder))
    require_current(folder, name, path, "export")
    if name.startswith("compress/"):
        _require_current_chain(folder, name)
    return _export(recipe, folder, name, path, fmt, out, preprocessing, record, exports)


def _require_current_chain(folder: str, name: str) -> None:
    """What bench and the report measure: a model of the last compress (made from the run's models as they are
    now: checked before), each model before it in the chain finished."""
    from ..pipeline.artifacts import require_saved
    from ..pipeline.rundir import require_current
    from .bench import chain_names
    chain = chain_names(folder)
    _compress_again(folder, name, None if name in chain else "not a model of the last compress "
                    "(compress/compress.json): one an earlier chain made, maybe from an earlier version of its source")
    for before in chain[:chain.index(name)]:  # (each step distils the model before it: one unfinished is made anew)
        require_current(folder, before, require_saved(folder, before), "export")


def _compress_again(folder: str, name: str, why: Optional[str]) -> None:
    if why:
        raise UserError(f"--model {name}: {why}; compress again first: distill compress {shlex.quote(folder)}")


def _out_file(folder: str, name: str, fmt: str, out: Optional[str], record: str) -> str:
    from .export import SUFFIX
    out = out or os.path.join(folder, "export", name.replace("/", "-") + SUFFIX.get(fmt, ""))
    if os.path.realpath(out) == os.path.realpath(record):
        raise UserError(f"--out {out}: the record of the run's exports; name the exported file otherwise")
    other = next((f for f, ext in SUFFIX.items() if out.endswith(ext) and f != fmt), None)
    if other:  # (a TorchScript file named .onnx is found, and misread, by whatever looks for .onnx files)
        raise UserError(f"--out {out}: the name of {'an' if other[0] in 'aeiou' else 'a'} {other} file, and --format "
                        f"is {fmt}; name it {os.path.splitext(out)[0] + SUFFIX.get(fmt, '/')}")
    return out


def _export(recipe, folder: str, name: str, path: str, fmt: str, out: Optional[str], preprocessing: bool,
            record: str, exports: Dict[str, Any]) -> str:
    from ..data import load_data
    from ..io import load_meta, write_json
    from ..pipeline.artifacts import load_model_at, require_same_data
    from ..pipeline.rundir import data_cfg_for, stage_fingerprints
    from .export import export_model, raw_inputs
    from .measure import is_hf_lm
    data = load_data(data_cfg_for(recipe.cfg, name))  # (a student of another tokenizer: its own tokens)
    require_same_data(folder, name, data)  # (the export is checked on test inputs)
    model = load_model_at(path, name)
    version = stage_fingerprints(folder).get(name)  # (which version of the model the record is of)
    out = _out_file(folder, name, fmt, out, record)
    # the model file's own record of its input normalisation; HF folders (text) have none, and runs made
    # before it was saved lack the key: both read as {} (the export then takes the model's inputs as they are)
    saved = load_meta(path) if os.path.isfile(path) else {}
    prep = saved.get("preprocessing") or {}
    meta = {"role": name, "class_names": data.class_names, "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "preprocessing": prep,
            # (the architecture, and a compressed model's structure: without them no one rebuilds the file)
            # (deploy: how a model trained for lower precision, compress/qat, is meant to run)
            **{k: saved[k] for k in ("spec", "structure", "rows", "deploy") if k in saved}}  # (rows: see check_split)
    if fmt == "hf":
        return _export_hf(model, name, path, saved, data, out, meta, version, record, exports)
    if is_hf_lm(model) and fmt in ("onnx", "torchscript"):
        raise UserError(f"--format {fmt}: {name} is a Hugging Face causal LM, deployed as its folder "
                        f"({path}), which plain transformers loads and generates from; export it as safetensors, "
                        f"or measure its variants with distill bench")
    int8 = fmt == "torchscript" and str(saved.get("deploy")).startswith("dynamic int8")
    if int8:  # (TorchScript holds int8 modules; torch.onnx and safetensors do not)
        from .quantize import dynamic_int8
        model = dynamic_int8(model)
    x = data.x_test[:8]  # normalised with data.stats; a baked-in export is checked on the raw inputs instead
    bake = preprocessing and fmt != "safetensors" and "normalize" in prep
    if bake and data.stats:
        x = raw_inputs(x, data.stats, data.image)
    info = {**export_model(model, x, fmt, out, meta, prep if bake else None), "fingerprint": version,
            **({"deploy": saved["deploy"], "int8": int8} if "deploy" in saved else {})}
    write_json(record, with_entry(exports, f"{name}.{fmt}", info))
    return (f"{name} -> {out} ({info['size_bytes'] / 1024:,.1f} KB); outputs match PyTorch within "
            f"{info['max_abs_diff']:.2g} (tolerance {info['tolerance']:.2g}) on {info['checked_on']} test inputs; "
            f"{_takes(info, prep, fmt, bool(data.stats))}{_deploy(saved.get('deploy'), int8, fmt)}")


def _deploy(deploy: Optional[str], int8: bool, fmt: str) -> str:
    """For a model trained to run in lower precision (compress/qat, whose file keeps float weights): whether the
    export runs so (TorchScript is written in int8) or how to make it (ONNX and safetensors hold float weights)."""
    if not deploy:
        return ""
    if int8:
        return f"; as {deploy}, as it was trained to run"
    how = "onnxruntime.quantization.quantize_dynamic" if fmt == "onnx" else "torch.ao.quantization.quantize_dynamic"
    return (f"; trained to run as {deploy}: the file holds its float weights, quantize them so to deploy it "
            f"({how}; distill bench writes such a file in bench/files/)")


def _export_hf(model, name: str, path: str, saved: Dict[str, Any], data, out: str, meta: Dict[str, Any],
               version: Optional[str], record: str, exports: Dict[str, Any]) -> str:
    """A Hugging Face folder (GPT-2 layout) that plain transformers loads, for the registry's GPT."""
    from ..io import write_json
    from ..models.gpt import GPT
    from .hf_gpt import export_gpt2
    if not isinstance(model, GPT):
        if not saved.get("spec"):
            raise UserError(f"--format hf: for the registry's gpt language models; {name} is a Hugging Face "
                            f"folder already ({path}), which plain transformers loads")
        raise UserError(f"--format hf: for the registry's gpt language models; {name} is a "
                        f"'{saved['spec'].get('model')}' model (export it as onnx, torchscript or safetensors)")
    info = {**export_gpt2(model, data.class_names, data.x_test[:8], out, meta), "fingerprint": version}
    write_json(record, with_entry(exports, f"{name}.hf", info))
    return (f"{name} -> {out}/ (GPT-2 layout, {info['size_bytes'] / 1024:,.1f} KB); logits match within "
            f"{info['max_abs_diff']:.2g} and greedy tokens are equal on {info['checked_on']} test windows")


def with_entry(exports: Dict[str, Any], key: str, info: Dict[str, Any]) -> Dict[str, Any]:
    """exports.json with this export's entry, its path absolute (a relative --out is of the directory the
    command ran in, which a later export need not share); another entry of the same file is dropped (the file
    is this export's now: it described another model's, which is gone)."""
    info = {**info, "path": os.path.abspath(info["path"])}
    here = os.path.realpath(info["path"])
    return {**{k: v for k, v in exports.items() if not (isinstance(v, dict) and isinstance(v.get("path"), str)
                                                        and os.path.realpath(v["path"]) == here)}, key: info}


def _takes(info: Dict[str, Any], prep: Dict[str, Any], fmt: str, has_stats: bool) -> str:
    """What the exported file takes as input, said plainly."""
    if info["preprocessing"] == "baked":
        return "takes raw inputs (normalisation baked in)"
    if "normalize" in prep:
        return ("weights only (normalisation in its metadata)" if fmt == "safetensors"
                else "takes normalised inputs (--no-preprocessing)")
    return ("takes normalised inputs (the model file predates saved normalisation statistics; "
            "re-train it to bake them in)" if has_stats else "takes inputs as they are (no normalisation)")
