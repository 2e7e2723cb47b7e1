"""Causal language modelling: each sample is a sequence of tokens, the target the same sequence shifted by one
(-100 where no loss counts: the prompt, the padding). The batch's mask is the positions with a target; the
model is selected by validation loss, and the test metrics are the loss per target token, perplexity, top-1
accuracy, bits per character for character vocabularies, and, for a Hugging Face model, bits per byte of the
text (comparable across tokenizers) and, for prompt/completion data, exact match of greedy completions
(`evaluate.exact_match`).

Scores are summed batch by batch (never all logits at once: 100 sequences x 256 tokens x 49k vocabulary
would be 5 GB), and with several processes each scores its own rows and the sums are added up.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import last_target
from ..engine.batch import Batch
from ..engine.inference import model_device
from ..registry import TASKS

# A language model's measures where lower is better (every other, accuracy and exact match included, is higher)
LOWER_IS_BETTER = ("loss", "bpc", "bits_per_byte", "perplexity")


def trimmed(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """The columns up to the batch's longest real sequence (the padding after it trains nothing)."""
    width = max(int(last_target(y).max()), 1) if len(y) else y.shape[1]
    return x[:, :width], y[:, :width]


def token_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, runtime: Any = None) -> torch.Tensor:
    """[summed next-token cross-entropy (nats), correctly predicted tokens, target tokens] over the rows, in
    float64, in eval mode without a graph."""
    rows = range(len(x))
    if runtime is not None and runtime.distributed:
        from ..engine.runtime import shard
        rows = shard(len(x), runtime.world_size, runtime.rank)
    was_training, device = model.training, model_device(model)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    try:
        with torch.inference_mode():
            for i in range(rows.start, rows.stop, batch_size):
                xb, yb = trimmed(x[i:min(i + batch_size, rows.stop)], y[i:min(i + batch_size, rows.stop)])
                logits = model(xb.to(device)).float()  # (scored where the model is: three numbers come back)
                flat, target = logits.reshape(-1, logits.shape[-1]), yb.reshape(-1).to(device)
                sums += torch.tensor([F.cross_entropy(flat, target, ignore_index=-100, reduction="sum").item(),
                                      ((flat.argmax(-1) == target) & (target >= 0)).sum().item(),
                                      (target >= 0).sum().item()], dtype=torch.float64)
    finally:
        model.train(was_training)
    return runtime.sum(sums) if runtime is not None and runtime.distributed else sums


def agreement(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
              ) -> Dict[str, float]:
    """Mean KL(teacher || student) per target token (nats, T = 1) and how often their top-1 tokens agree."""
    device_t, device_s = model_device(teacher), model_device(student)
    modes = teacher.training, student.training
    teacher.eval(), student.eval()
    kl, same, n = 0.0, 0, 0
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                xb, yb = trimmed(x[i:i + batch_size], y[i:i + batch_size])
                t = teacher(xb.to(device_t)).float().to(device_s)  # (compared where the student is)
                s = student(xb.to(device_s)).float()
                v = min(t.shape[-1], s.shape[-1])
                keep = (yb >= 0).to(device_s)
                t, s = t[keep][:, :v], s[keep][:, :v]
                kl += float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
                same += int((t.argmax(-1) == s.argmax(-1)).sum())
                n += int(keep.sum())
    finally:
        teacher.train(modes[0]), student.train(modes[1])
    return {"teacher_kl": kl / max(n, 1), "top1_agreement": same / max(n, 1)}


def scores(sums: torch.Tensor, characters: bool) -> Dict[str, float]:
    loss = float(sums[0] / sums[2].clamp_min(1))
    out = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": float(sums[1] / sums[2].clamp_min(1))}
    if characters:
        out["bpc"] = loss / math.log(2)
    return out


def completion_bytes(tokenizer: Any, y: torch.Tensor) -> int:
    """UTF-8 bytes of the text the targets spell, as the tokenizer decodes each row's (special tokens left out):
    what bits per byte divide by, the same text for models of different tokenizers."""
    return sum(len(tokenizer.decode(row[row >= 0].tolist(), skip_special_tokens=True).encode("utf-8")) for row in y)


def token_metrics(logits: torch.Tensor, y: torch.Tensor, characters: bool = False) -> Dict[str, float]:
    """Mean next-token cross-entropy (nats), perplexity and top-1 accuracy over the targets; bits per character
    when the tokens are characters."""
    flat, target = logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)
    keep = target >= 0
    sums = torch.tensor([F.cross_entropy(flat, target, ignore_index=-100, reduction="sum").item(),
                         ((flat.argmax(-1) == target) & keep).sum().item(), keep.sum().item()], dtype=torch.float64)
    return scores(sums, characters)


def prompts_and_answers(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Per row, the prompt's token ids (the input up to the first target) and the reference completion's
    (the targets)."""
    prompts, answers = [], []
    for xr, yr in zip(x.tolist(), y.tolist()):
        first = next(i for i, t in enumerate(yr) if t >= 0)
        prompts.append(xr[:first + 1])
        answers.append([t for t in yr if t >= 0])
    return prompts, answers


def extract(text: str, pattern: Optional[str]) -> Optional[str]:
    """The answer in a completion: the last match of `pattern` (its first group that matched, if it has
    groups), else the whole text stripped; None when nothing is found. A match of no characters finds
    nothing (`\\d*` matches every text: each would equal every other)."""
    if not pattern:
        return text.strip()
    found = [m for m in re.finditer(pattern, text) if m.group(0).strip()]
    if not found:
        return None
    m = found[-1]  # (of several groups, the first that matched: alternatives each have their own)
    answer = m.group(0) if not m.groups() else next((g for g in m.groups() if g and g.strip()), "")
    return answer.strip() or None  # (groups unmatched, or matched empty: none)


def greedy_completions(model: nn.Module, prompts: list, max_new_tokens: int, batch_size: int = 8) -> list:
    """The tokens each prompt's greedy completion writes, up to and including EOS, in batches."""
    return [tokens for i in range(0, len(prompts), batch_size)
            for tokens, _ended in model.complete(prompts[i:i + batch_size], max_new_tokens)]


def score_completions(tokenizer: Any, prompts: list, completions: list, answers: list, cfg: Dict[str, Any]
                      ) -> Dict[str, Any]:
    """Exact match of the answer extracted from each completion against the reference's, BLEU and chrF
    (sacrebleu, when installed), and a few samples."""
    hits, samples, texts, refs = 0, [], [], []
    for prompt, tokens, answer in zip(prompts, completions, answers):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        ref = tokenizer.decode(answer, skip_special_tokens=True)
        texts.append(text), refs.append(ref)
        got, want = extract(text, cfg["answer"]), extract(ref, cfg["answer"])
        hits += got is not None and got == want
        if len(samples) < 3:
            samples.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True)[-200:],
                            "completion": text[:300], "reference": ref[:300]})
    out = {"exact_match": hits / max(len(prompts), 1), "samples": samples}
    try:  # BLEU and chrF of the completions against the references (sacrebleu, when installed)
        import sacrebleu
        out["bleu"] = sacrebleu.corpus_bleu(texts, [refs]).score
        out["chrf"] = sacrebleu.corpus_chrf(texts, [refs]).score
    except ImportError:
        pass
    return out


def exact_match(model: nn.Module, tokenizer: Any, x: torch.Tensor, y: torch.Tensor, cfg: Dict[str, Any],
                batch_size: int = 8) -> Dict[str, Any]:
    """Greedy completions of the first `cfg.rows` prompts, scored by `score_completions`; with the tokens they
    wrote per second (at `batch_size`): the pace of this pass, not a model's decode speed (a batch steps until
    its longest completion ends, so it depends on what each model writes; `distill bench` measures decoding)."""
    prompts, answers = prompts_and_answers(x[:cfg["rows"]], y[:cfg["rows"]])
    t0 = time.perf_counter()
    completions = greedy_completions(model, prompts, cfg["max_new_tokens"], batch_size)
    rate = sum(map(len, completions)) / (time.perf_counter() - t0)  # (completing alone, not the scoring)
    out = score_completions(tokenizer, prompts, completions, answers, cfg)
    return {"exact_match": out.pop("exact_match"), "completion_tokens_per_s": rate, **out}


def bench_prompt(data: Any, model: nn.Module, new_tokens: int) -> tuple:
    """(prompt, new tokens) that decode speed is measured with: the first test prompt of prompt/completion
    data, else the first 32 tokens of the first test text; for a model with a fixed context (the project's
    GPT) both cut so that the whole decode stays within it, where every step uses the KV cache."""
    prompt = prompts_and_answers(data.x_test[:1], data.y_test[:1])[0][0] if data.pad_id is not None \
        else data.x_test[0, :32].tolist()
    context = getattr(model, "context", None)
    if context is None:
        return prompt, new_tokens
    prompt = prompt[:max(1, min(len(prompt), context - new_tokens))]
    return prompt, min(new_tokens, context - len(prompt))


def decode_seconds(model: nn.Module, prompt: list, new_tokens: int, batch: int = 1) -> float:
    """Wall time of greedy decoding `new_tokens` tokens after `batch` copies of `prompt`, with the KV cache;
    EOS is ignored, so that every call decodes all of them (prefill included: see `decode_rate`)."""
    t0 = time.perf_counter()
    if hasattr(model, "complete"):  # a Hugging Face model
        eos, model.eos_id = model.eos_id, -1
        try:
            out = model.complete([list(prompt)] * batch, new_tokens)
        finally:
            model.eos_id = eos
        assert all(len(ids) == new_tokens for ids, _ in out)
    else:  # the project's own GPT
        model.generate(torch.tensor([list(prompt)] * batch, device=model_device(model)), new_tokens, temperature=0)
    return time.perf_counter() - t0


def decode_rate(model: nn.Module, prompt: list, new_tokens: int, batch: int, runs: int) -> list:
    """Seconds per decoding step (all `batch` rows advance one token) of each of `runs` decodes, after a
    warm-up: the time of `new_tokens` + 1 tokens less the median time of 1 (the prefill, its first token
    and the call's setup), over `new_tokens`."""
    decode_seconds(model, prompt, 2, batch)  # (warm-up)
    first = statistics.median(decode_seconds(model, prompt, 1, batch) for _ in range(runs))
    return [max(decode_seconds(model, prompt, new_tokens + 1, batch) - first, 0.0) / new_tokens for _ in range(runs)]


@TASKS.register("causal_lm")
class CausalLM:
    name = "causal_lm"
    select_metric = "val_loss"

    def __init__(self, data: Any = None, cfg: Any = None) -> None:
        self.characters = data is None or bool(getattr(data, "class_names", None))  # (a character vocabulary)
        em = (cfg or {}).get("evaluate", {}).get("exact_match", {})
        # validation exact match: greedy completions of the validation prompts after each epoch
        self.val_em = em if em.get("validate") and em.get("rows") and getattr(data, "tokenizer", None) else None
        self.tokenizer_path, self._tokenizer = data.tokenizer if self.val_em else None, None

    def lower_is_better(self, metric: str) -> bool:
        return metric.endswith(LOWER_IS_BETTER)

    def collate(self, data: Any, idx: torch.Tensor, transforms: Dict[str, Any], seed: int) -> Batch:
        x, y = data.x_train[idx], data.y_train[idx]
        if data.pad_id is not None:  # (prompt/completion sequences of unequal length)
            x, y = trimmed(x, y)
        return Batch(x, y, idx, y >= 0)

    def counts(self, logits: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Correctly predicted next tokens and how many were predicted (the training accuracy)."""
        return {"correct": (logits.argmax(-1) == y).sum(), "labelled": (y >= 0).sum()}

    def validate(self, model: nn.Module, data: Any, batch_size: int, runtime: Any = None) -> Dict[str, float]:
        if not len(data.y_val):
            return {}
        m = scores(token_sums(model, data.x_val, data.y_val, batch_size, runtime), self.characters)
        out = {"val_loss": m["loss"], "val_accuracy": m["accuracy"], **({"val_bpc": m["bpc"]} if "bpc" in m else {})}
        if self.val_em and hasattr(model, "complete"):  # (every process scores the same rows: greedy, the same)
            if self._tokenizer is None:  # (loaded once, at the first epoch's validation)
                from ..models.hf import load_tokenizer
                self._tokenizer = load_tokenizer(self.tokenizer_path, "data.tokenizer")
            em = exact_match(model, self._tokenizer, data.x_val, data.y_val, self.val_em)
            out["val_exact_match"] = em["exact_match"]
        return out

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ecfg: Dict[str, Any], batch_size: int,
                 runtime: Any = None, path: Optional[str] = None) -> Dict[str, Any]:
        sums = token_sums(model, x, y, batch_size, runtime)
        out: Dict[str, Any] = scores(sums, self.characters)
        if not (hasattr(model, "complete") and path and (runtime is None or runtime.is_main)):
            return out
        from ..models.hf import load_tokenizer
        tokenizer = load_tokenizer(path, "evaluate")
        # per byte of text, not per token: comparable between models of different tokenizers (lm-eval's bits_per_byte)
        out["bits_per_byte"] = float(sums[0]) / math.log(2) / max(completion_bytes(tokenizer, y), 1)
        em = ecfg.get("exact_match") or {}
        if em.get("rows"):  # (batches of 8 on the CPU, as validation's; of data.eval_batch_size on a GPU)
            gpu = next(model.parameters()).device.type == "cuda"
            out.update(exact_match(model, tokenizer, x, y, em, batch_size if gpu else 8))
        return out

    def metrics(self, logits: torch.Tensor, y: torch.Tensor, ecfg: Dict[str, Any]) -> Dict[str, float]:
        return token_metrics(logits, y, self.characters)

    def agreement(self, teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  batch_size: int) -> Dict[str, float]:
        return agreement(teacher, student, x, y, batch_size)

