"""Teacher-written training data (sequence-level KD, DeepSeek-R1's practice): the teacher samples `samples`
completions per training prompt, a verifier keeps the correct ones, and the student is fine-tuned on them.

Generation is batched (`batch_size` prompts, each repeated `samples` times) with the KV cache. Every batch
is appended to `<out>.partial` (one JSON line per completion, kept or not, flushed and fsynced) before the
next begins, and sampled with a seed of its own (run seed, batch index): a killed generation resumes at the
first batch not on disk and ends with the same rows as an uninterrupted one, none twice or missing.

A completion is dropped when it was cut at `max_new_tokens` without EOS (truncated), when it ended with no
text (empty: EOS at once, or special tokens only; a student taught it would stop straight after a prompt, and
the same row in the data is refused), or, with `verify`, when the answer extracted from it (the regex
`evaluate.exact_match.answer`) differs from the reference's.
The output, written atomically at the end, is a JSONL file of the kept {prompt, completion} rows with their
token ids (the student trains on the ids), and `<out>.provenance.json`: teacher hash, sampling
settings, seed, counts and tokens/s.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from ..io import atomic_path, sha256_json, write_json
from ..progress import bar
from ..tasks.causal_lm import extract


def _done_rows(partial: str, key: str) -> List[Dict[str, Any]]:
    """The whole lines of a partial file (a line cut by a kill is dropped, and its batch redone); none when its
    first line is not `key`: a generation of other prompts, settings or teacher, killed, is not continued."""
    if not os.path.isfile(partial):
        return []
    rows = []
    with open(partial, encoding="utf-8") as fh:
        if fh.readline() != json.dumps({"key": key}) + "\n":
            return []
        for line in fh:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


def generate(teacher: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Optional[str]],
             settings: Dict[str, Any], answer: Optional[str], out: str, provenance: Dict[str, Any],
             show: bool = True) -> Dict[str, Any]:
    """Write the kept completions of `prompts` to `out` (see the module's docstring); returns the counts.
    `answers` are the reference answers the verifier compares with (the regex `answer`'s finding in each
    completion)."""
    n, size = settings["samples"], settings["batch_size"]
    partial = out + ".partial"
    key = sha256_json({"provenance": provenance, "settings": settings, "answer": answer, "prompts": prompts,
                       "answers": answers})
    done = _done_rows(partial, key)
    batches = list(range(0, len(prompts), size))
    finished = {r["batch"] for r in done}
    complete = {b for b in finished if sum(r["batch"] == b for r in done) == n * len(prompts[b * size:(b + 1) * size])}
    rows = [r for r in done if r["batch"] in complete]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(partial) as tmp, open(tmp, "w", encoding="utf-8") as fh:  # (rewritten without any half-
        fh.writelines(json.dumps(r) + "\n" for r in [{"key": key}, *rows])  # written batch; a kill here keeps it)
    t0, tokens = time.perf_counter(), 0
    todo = [i for i, _ in enumerate(batches) if i not in complete]
    with open(partial, "a", encoding="utf-8") as fh:
        progress = bar(todo, desc="teacher writes", unit="batch", show=show)
        for b in progress:
            group = list(range(b * size, min((b + 1) * size, len(prompts))))
            asked = [prompts[i] for i in group for _ in range(n)]
            outs = teacher.complete(asked, settings["max_new_tokens"], settings["temperature"], settings["top_p"],
                                    seed=provenance["seed"] * 1_000_003 + b)
            for j, (ids, ended) in enumerate(outs):
                i = group[j // n]
                tokens += len(ids)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                correct = None
                if settings["verify"]:
                    got = extract(text, answer)
                    correct = got is not None and got == answers[i]
                row = {"batch": b, "row": i, "sample": j % n, "prompt_ids": list(prompts[i]), "completion_ids": ids,
                       "completion": text, "ended": ended, "correct": correct}
                fh.write(json.dumps(row) + "\n")
                rows.append(row)
            fh.flush()
            os.fsync(fh.fileno())
            progress.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - t0):,.0f}", refresh=False)
    seconds = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["row"], r["sample"]))
    empty = [r["ended"] and not r["completion"].strip() for r in rows]
    kept = [r for r, e in zip(rows, empty) if r["ended"] and not e and r["correct"] is not False]
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in kept:
                fh.write(json.dumps({"prompt": tokenizer.decode(r["prompt_ids"], skip_special_tokens=False),
                                     "completion": r["completion"], "row": r["row"], "sample": r["sample"],
                                     "prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]}) + "\n")
    counts = {"prompts": len(prompts), "generated": len(rows), "kept": len(kept),
              "truncated": sum(not r["ended"] for r in rows), "empty": sum(empty),
              "wrong": sum(r["ended"] and not e and r["correct"] is False for r, e in zip(rows, empty)),
              "tokens_per_s": round(tokens / seconds, 1) if todo and seconds > 0 else None,
              "resumed_batches": len(complete)}
    write_json(out + ".provenance.json", {**provenance, "settings": dict(settings), "answer": answer, **counts})
    os.remove(partial)
    return counts
