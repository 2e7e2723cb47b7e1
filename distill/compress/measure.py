"""The variants that `distill bench` measures: how each is made, written to a file, and run.

`write_file` runs in the bench process and writes the deployable file of a variant (its size is the size
column). `main` is the server that bench starts (`python -m distill.compress.measure`, jobs as JSON lines on
stdin): a fresh interpreter that imports torch, distill and what measuring uses once and forks a process per
variant, which loads or converts the model, resets the peak-memory mark, then measures test accuracy
(and validation accuracy, which bench's recommendation is chosen on), batch-1 latency percentiles and
throughput, and answers one JSON line.

A language model is measured as it is used: test perplexity and next-token accuracy over the completion
tokens, the time per step of greedy decoding with the KV cache at batch 1 (percentiles over a few decodes of
DECODE tokens, the prefill taken out) and tokens/s at `evaluate.throughput_batch`, the prefill latency of the
first test prompt, and the peak memory of decoding.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import re
import resource
import statistics
import sys
import tempfile
from dataclasses import replace
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..data import DataBundle, load_data
from ..errors import UserError
from ..evaluate import latency_percentiles, typical_sample, weights_size
from ..tasks.classification import classification_metrics
from ..models import count_params
from ..models.hf import trim_padding
from ..engine.inference import predict
from . import quantize

EXT = {"dynamic": ".pt", "static": ".pt", "fp16": ".safetensors", "bf16": ".safetensors", "onnx": ".onnx",
       "onnx_dynamic": ".onnx", "onnx_static": ".onnx"}
LM_VARIANTS = ("fp32", "dynamic", "fp16", "bf16")  # (the rest trace fixed-shape graphs of classifiers)
DECODE = 64  # new tokens per decode measurement of a language model
LM_RUNS = 5  # decodes per speed measurement of a language model (see lm_runs)


def variant_path(folder: str, name: str, variant: str, hf_folder: bool = False) -> Optional[str]:
    """Where the variant's deployable file goes (None: it has none); fp16/bf16 of a Hugging Face model are a
    Hugging Face folder, whose tied embedding and output layer are stored once."""
    if variant not in EXT:
        return None
    ext = "" if hf_folder and variant in ("fp16", "bf16") else EXT[variant]
    return os.path.join(folder, "bench", "files", f"{name.replace('/', '-')}-{variant}{ext}")


def is_hf_lm(model: nn.Module) -> bool:
    return hasattr(model, "complete")


def calibration(data: DataBundle, n: int) -> torch.Tensor:
    """`n` training samples drawn at random with a fixed seed (static int8 is the same every time): the first
    `n` of a file sorted by class would calibrate the activation ranges on a few classes only."""
    return data.x_train[data.training_sample(n)]


def _onnx_feeds(model: nn.Module, x: torch.Tensor):
    from .export import signature
    return [{k: v.numpy() for k, v in signature(model, x[i:i + 1])[1].items()} for i in range(len(x))]


def convert(model: nn.Module, variant: str, data: DataBundle, cfg: Dict[str, Any]) -> nn.Module:
    """The PyTorch form of a variant."""
    calib = calibration(data, cfg["bench"]["calibration"])
    if variant == "dynamic":
        return quantize.dynamic_int8(model)
    if variant == "static":
        return quantize.static_int8(model, calib)
    if variant in ("fp16", "bf16"):
        cast = quantize.cast_weights(model, variant)  # (a language model's inputs are token ids: no cast)
        return cast if getattr(model, "per_position", False) else _Cast(cast, quantize.DTYPES[variant])
    if variant == "torchao":
        return quantize.torchao_int8(model)
    if variant == "pt2e":
        return quantize.pt2e_int8(model, calib)
    return model.eval()


class _Cast(nn.Module):
    """Half-precision weights: float inputs are cast to match, logits come back as float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.pad_id = getattr(model, "pad_id", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype) if x.is_floating_point() else x).float()


class _OnnxRuntime(nn.Module):
    """An ONNX Runtime session behind the usual one-tensor interface (text: trimmed ids and mask)."""

    def __init__(self, path: str, pad_id: Optional[int], threads: int) -> None:
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.pad_id = pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_id is None:
            return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])
        ids, mask = trim_padding(x, self.pad_id)
        return torch.from_numpy(self.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])


def write_file(model: nn.Module, variant: str, data: DataBundle, cfg: Dict[str, Any], folder: str,
               name: str, source: str) -> Optional[str]:
    """Write the deployable file of `variant` of the model saved at `source` (in the bench process); None
    for variants without one."""
    from ..io import atomic_path, load_meta, save_model
    from ..models.hf import save_folder
    from .export import export_model
    path = variant_path(folder, name, variant, is_hf_lm(model))
    if path is None:
        return None
    if variant == "onnx":  # (taking raw inputs, the normalisation baked in, as distill export writes it)
        prep = baked(source, data)
        export_model(model, _as_read(data.x_test[:8], data, prep), "onnx", path,
                     {"role": name, "class_names": data.class_names}, prep)
    elif variant.startswith("onnx_"):
        fp32 = variant_path(folder, name, "onnx")
        if not os.path.isfile(fp32):
            write_file(model, "onnx", data, cfg, folder, name, source)
        calib = _as_read(calibration(data, cfg["bench"]["calibration"]), data, baked(source, data))
        feeds = _onnx_feeds(model, calib) if variant == "onnx_static" else None
        quantize.onnx_int8(fp32, path, variant[5:], feeds)
    elif variant in ("fp16", "bf16") and is_hf_lm(model):
        save_folder(convert(model, variant, data, cfg), path, source, {"role": name, "precision": variant})
    elif variant in ("fp16", "bf16"):  # (with the source's header: its architecture, so that distill loads it)
        cast = convert(model, variant, data, cfg)
        header = load_meta(source) if os.path.isfile(source) else {}  # (a transformer's folder has no such header)
        save_model(getattr(cast, "model", cast), path, {**header, "role": name, "precision": variant})
    else:
        with atomic_path(path) as tmp:
            torch.save(convert(model, variant, data, cfg).state_dict(), tmp)
    return path


def baked(source: str, data: DataBundle) -> Optional[Dict[str, Any]]:
    """The preprocessing an ONNX file of the model saved at `source` bakes in (its normalisation), else None."""
    from ..io import load_meta
    prep = (load_meta(source).get("preprocessing") or {}) if os.path.isfile(source) else {}
    return prep if "normalize" in prep and data.stats and data.pad_id is None else None


def _as_read(x: torch.Tensor, data: DataBundle, prep: Optional[Dict[str, Any]]) -> torch.Tensor:
    """The data's (normalised) inputs `x` as the reader gave them, for a file that bakes `prep` in; else `x`."""
    from .export import raw_inputs
    return raw_inputs(x, data.stats, data.image) if prep else x


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _reset_peak() -> bool:
    """Start a new peak-RSS mark (Linux: clear_refs 5); False where unsupported (peak then includes loading)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(job: Dict[str, Any]) -> Dict[str, Any]:
    from ..pipeline.artifacts import load_model_at
    from ..pipeline.rundir import data_cfg_for
    cfg, variant, ecfg = job["cfg"], job["variant"], job["cfg"]["evaluate"]
    torch.set_num_threads(ecfg["threads"])
    data = load_data(data_cfg_for(cfg, job["name"]))  # (a student of another tokenizer: in its own tokens)
    gc.collect()
    base = _rss_mb()
    model = load_model_at(job["path"], job["name"])
    params = count_params(model)
    file = variant_path(job["folder"], job["name"], variant, is_hf_lm(model))
    if variant.startswith("onnx"):
        del model
        run: nn.Module = _OnnxRuntime(file, data.pad_id, ecfg["threads"])
        prep = baked(job["path"], data)
        if prep:  # (a file that normalises its inputs is fed them as read: converted once, not in the timed calls)
            data = replace(data, x_test=_as_read(data.x_test, data, prep), x_val=_as_read(data.x_val, data, prep))
    else:
        run = convert(model, variant, data, cfg)
        if run is not model:
            del model
    gc.collect()
    _reset_peak()
    numbers = lm_numbers(run, data, cfg) if getattr(data, "task", None) == "causal_lm" else \
        classifier_numbers(run, data, cfg)
    file = job["path"] if variant == "fp32" else file
    return {**numbers, "params": params, "file": file, "size_bytes": weights_size(file) if file else None,
            "peak_mb": _peak_mb() - base}


def classifier_numbers(run: nn.Module, data: DataBundle, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Test accuracy and macro-F1, validation accuracy, batch-1 latency percentiles and throughput at
    `evaluate.throughput_batch`."""
    ecfg = cfg["evaluate"]
    logits = predict(run, data.x_test, cfg["data"]["eval_batch_size"])
    metrics = classification_metrics(logits, data.y_test, ecfg["positive_class"])
    val = {}
    if len(data.y_val):  # what the recommendation chooses on (the test split is only reported)
        val_logits = predict(run, data.x_val, cfg["data"]["eval_batch_size"])
        val["val_accuracy"] = classification_metrics(val_logits, data.y_val, ecfg["positive_class"])["accuracy"]
    sample = typical_sample(data.x_test, run)
    p50, p95 = latency_percentiles(run, sample, cfg["bench"]["latency_runs"], ecfg["threads"])
    big = data.x_test[:ecfg["throughput_batch"]]
    batch_ms = latency_percentiles(run, big, max(5, cfg["bench"]["latency_runs"] // 10), ecfg["threads"])[0]
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], **val, "p50_ms": p50, "p95_ms": p95,
            "throughput": len(big) / batch_ms * 1000}


def lm_runs(cfg: Dict[str, Any]) -> int:
    """Decodes per speed measurement of a language model (each is DECODE tokens, not one forward pass)."""
    return max(3, min(cfg["bench"]["latency_runs"], LM_RUNS))


def lm_numbers(run: nn.Module, data: DataBundle, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Test perplexity and next-token accuracy (the accuracy column; validation accuracy too), milliseconds per
    decoding step at batch 1 (p50, p95; the prefill not included), decoded tokens/s at
    `evaluate.throughput_batch`, and the prefill of the first test prompt. The peak-memory mark is reset after
    the perplexity pass (which holds a batch of full-vocabulary logits): the peak is that of decoding."""
    from ..tasks.causal_lm import CausalLM, bench_prompt, decode_rate, scores, token_sums
    ecfg, runs = cfg["evaluate"], lm_runs(cfg)
    bs, characters = cfg["data"]["eval_batch_size"], CausalLM(data).characters
    m = scores(token_sums(run, data.x_test, data.y_test, bs), characters)
    if len(data.y_val):  # what the recommendation chooses on (the test split is only reported)
        m["val_accuracy"] = scores(token_sums(run, data.x_val, data.y_val, bs), characters)["accuracy"]
    gc.collect()
    _reset_peak()
    prompt, new = bench_prompt(data, run, DECODE)
    per_token = decode_rate(run, prompt, new, 1, runs)
    batch = ecfg["throughput_batch"]
    batched = statistics.median(decode_rate(run, prompt, new, batch, runs))
    prefill = latency_percentiles(run, torch.tensor([prompt]), runs, ecfg["threads"])[0]
    return {"accuracy": m["accuracy"], "perplexity": m["perplexity"], **({"bpc": m["bpc"]} if "bpc" in m else {}),
            **({"val_accuracy": m["val_accuracy"]} if "val_accuracy" in m else {}),
            "p50_ms": 1000 * float(np.percentile(per_token, 50)), "p95_ms": 1000 * float(np.percentile(per_token, 95)),
            "throughput": batch / batched, "prefill_ms": prefill, "prompt_tokens": len(prompt), "decode_tokens": new}


# Imported by the server before it forks, so that no measurement pays for them: distill's always, transformers'
# (optional) once a job needs them, so that a bench of CNNs or tabular models does not import it at all.
# (scikit-learn's import, with scipy's, took 3 s of each measurement; static int8's FX tracing imports torch's
# compiler stack, sympy and networkx, which were counted in its peak memory)
PRELOAD = ("distill.pipeline.artifacts", "distill.pipeline.rundir", "sklearn.datasets", "sklearn.model_selection",
           "sklearn.metrics", "onnxruntime", "torch._dynamo", "torch.ao.quantization.quantize_fx")
PRELOAD_HF = ("transformers.modeling_utils", "transformers.models.auto.modeling_auto",
              "transformers.models.auto.tokenization_auto")


def needs_transformers(job: Dict[str, Any]) -> bool:
    """A Hugging Face model (saved as a folder) or data tokenised by a Hugging Face tokenizer."""
    return os.path.isdir(job["path"]) or bool(job["cfg"]["data"].get("tokenizer"))


def preload(modules: Any) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    # (what is imported is kept out of the garbage collector's reach: the collection each measurement makes
    # before it reads its memory then walks that measurement's objects, not every module's)
    gc.collect()
    gc.freeze()


def main() -> int:
    """The measurement server (bench starts it): one job per JSON line on stdin, one answer per line on
    stdout. It forks each measurement from this process, which has imported modules and run nothing."""
    preload(PRELOAD)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # (whatever else prints cannot reach the answers)
    hf = False
    for line in sys.stdin:
        job = json.loads(line)
        if not hf and needs_transformers(job):
            preload(PRELOAD_HF)
            hf = True
        print(json.dumps(forked(job)), file=answers, flush=True)
    return 0


def forked(job: Dict[str, Any]) -> Dict[str, Any]:
    """`measure(job)` in a forked process: its numbers, or {"error": why}. Its output goes to a file, whose
    last error line names a crash."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "output.txt")
        open(log, "w").close()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _measure_and_exit(job, write, log)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            answer = fh.read()
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if answer:
            return json.loads(answer)
        with open(log, errors="replace") as fh:  # (it died without a word: a crash, or killed for memory)
            return {"error": last_error(fh.read()) or f"exit code {status}"}


def _measure_and_exit(job: Dict[str, Any], write: int, log: str) -> None:
    try:
        fd = os.open(log, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            answer = measure(job)
        except Exception as e:  # a backend that fails or does not apply is a row of the table, not the end
            answer = {"error": failure(e)}
        with os.fdopen(write, "wb") as fh:
            fh.write(json.dumps(answer).encode())
    finally:
        os._exit(0)  # (no cleanup of the server's state: it is the server's)


def last_error(output: str) -> str:
    """The exception line of a traceback in `output` (or its last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return (named or lines or [""])[-1][:300]


def failure(e: Exception) -> str:
    """An exception as a row of the table says it: "n/a: why" where the variant does not apply here or its
    backend is missing (a UserError), else its type and first line."""
    if isinstance(e, UserError):
        return f"n/a: {e}"[:300]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


if __name__ == "__main__":
    sys.exit(main())
