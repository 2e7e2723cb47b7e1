"""A seeded generator of multi-step arithmetic problems with worked column steps and a final answer: the
reasoning task of the `arith_smollm2` benchmark (the R1-distill practice in miniature).

A problem chains `operations` additions and subtractions of `digits`-digit numbers, the running total never
negative. The worked trace does each operation in columns, ones first, with carries and borrows, and ends
with "Answer: N":

    Compute 47 + 86 - 29.
    47+86: ones 7+6=13, write 3 carry 1; tens 4+8+1=13, write 3 carry 1; hundreds 1. So 133.
    133-29: ones 3-9, borrow: 13-9=4; tens 3-1-2=0; hundreds 1. So 104.
    Answer: 104

`python -m distill.data.arith OUT_DIR --train 600 --test 100` writes OUT_DIR/train.jsonl and test.jsonl,
one {prompt, completion, answer} object a line, the two splits disjoint. `--prompts N` also writes
OUT_DIR/prompts.jsonl: N more problems, disjoint from both, as {prompt, answer} alone. Those stand for the
R1 practice's prompts whose worked solutions nobody wrote (a final answer is cheap to check, a worked trace
dear to write): the teacher writes their traces (`distill.sequence_kd`), the verifier keeps the right ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List, Tuple

from ..io import atomic_path

PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]


def place(i: int) -> str:
    """The name of column `i` (0: ones); past the named ones, its power of ten."""
    return PLACES[i] if i < len(PLACES) else f"10^{i}"
ANSWER = r"Answer:\s*(-?\d+)"  # the regex that extracts the final answer (evaluate.exact_match.answer)


def _digits(n: int, width: int) -> List[int]:
    return [(n // 10 ** i) % 10 for i in range(width)]


def column_add(a: int, b: int) -> str:
    width = len(str(max(a, b)))
    da, db, carry, steps = _digits(a, width), _digits(b, width), 0, []
    for i in range(width):
        s = da[i] + db[i] + carry
        terms = f"{da[i]}+{db[i]}" + (f"+{carry}" if carry else "")
        steps.append(f"{place(i)} {terms}={s}" + (f", write {s % 10} carry {s // 10}" if s >= 10 else ""))
        carry = s // 10
    if carry:
        steps.append(f"{place(width)} {carry}")
    return f"{a}+{b}: " + "; ".join(steps) + f". So {a + b}."


def column_sub(a: int, b: int) -> str:
    """a - b with a >= b, column by column with borrows."""
    width = len(str(a))
    da, db, borrow, steps = _digits(a, width), _digits(b, width), 0, []
    for i in range(width):
        top = da[i] - borrow
        left = f"{da[i]}-{borrow}" if borrow else f"{da[i]}"
        if top < db[i]:
            steps.append(f"{place(i)} {left}-{db[i]}, borrow: {top + 10}-{db[i]}={top + 10 - db[i]}")
            borrow = 1
        else:
            if i >= len(str(b)) and not borrow:
                steps.append(f"{place(i)} {da[i]}")
            else:
                steps.append(f"{place(i)} {left}-{db[i]}={top - db[i]}")
            borrow = 0
    return f"{a}-{b}: " + "; ".join(steps) + f". So {a - b}."


def problem(rng: random.Random, operations: int, digits: int) -> Dict[str, str]:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    total = rng.randint(lo, hi)
    text, lines = str(total), []
    for _ in range(operations):
        b = rng.randint(lo, hi)
        if b <= total and rng.random() < 0.5:
            lines.append(column_sub(total, b))
            text, total = f"{text} - {b}", total - b
        else:
            lines.append(column_add(total, b))
            text, total = f"{text} + {b}", total + b
    return {"prompt": f"Compute {text}.", "completion": "\n".join(lines) + f"\nAnswer: {total}", "answer": str(total)}


def generate(n: int, seed: int = 0, operations: int = 2, digits: int = 2, exclude: Tuple[str, ...] = ()
             ) -> List[Dict[str, str]]:
    """`n` distinct problems (none of whose prompts is in `exclude`), the same for the same arguments."""
    at_most = (9 * 10 ** (digits - 1)) ** (operations + 1) * 2 ** operations  # (numbers, and + or - each step)
    if n + len(exclude) > at_most:
        raise ValueError(f"cannot draw {n} distinct problems of {operations} operations on {digits} digits: there "
                         f"are at most {at_most:,}{f', {len(exclude):,} of them taken already' if exclude else ''}")
    rng, seen, rows = random.Random(seed), set(exclude), []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems of {operations} operations on {digits} digits")
        row = problem(rng, operations, digits)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def write_jsonl(path: str, rows: List[Dict[str, str]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def write_split(folder: str, n_train: int, n_test: int, seed: int = 0, operations: int = 2, digits: int = 2
                ) -> Tuple[str, str]:
    """train.jsonl and test.jsonl in `folder`: disjoint problems, the test set drawn first."""
    test, train = _splits(n_train, n_test, seed, operations, digits)
    paths = os.path.join(folder, "train.jsonl"), os.path.join(folder, "test.jsonl")
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], test)
    return paths


def _splits(n_train: int, n_test: int, seed: int, operations: int, digits: int) -> Tuple[list, list]:
    test = generate(n_test, seed + 1_000_003, operations, digits)
    return test, generate(n_train, seed, operations, digits, exclude=tuple(r["prompt"] for r in test))


def write_prompts(path: str, n: int, n_train: int, n_test: int, seed: int = 0, operations: int = 2,
                  digits: int = 2) -> str:
    """`n` problems disjoint from the train and test splits of the same arguments, as {prompt, answer}: no
    worked trace (the teacher writes those)."""
    test, train = _splits(n_train, n_test, seed, operations, digits)
    rows = generate(n, seed + 2_000_003, operations, digits, exclude=tuple(r["prompt"] for r in test + train))
    write_jsonl(path, [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="write a seeded multi-step arithmetic dataset (train/test JSONL)")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--operations", type=int, default=2)
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=0, help="also write prompts.jsonl: this many answer-only problems")
    a = p.parse_args(argv)
    for name, least in (("train", 1), ("test", 0), ("operations", 1), ("digits", 1), ("prompts", 0)):
        if getattr(a, name) < least:
            p.error(f"--{name}: must be {least} or more, got {getattr(a, name)}")
    try:
        os.makedirs(a.out, exist_ok=True)
        for path in write_split(a.out, a.train, a.test, a.seed, a.operations, a.digits):
            print(path)
        if a.prompts:
            print(write_prompts(os.path.join(a.out, "prompts.jsonl"), a.prompts, a.train, a.test, a.seed,
                                a.operations, a.digits))
    except (ValueError, OSError) as e:  # (more problems than there are of this size; an unwritable folder)
        p.error(str(e))


if __name__ == "__main__":
    main()
