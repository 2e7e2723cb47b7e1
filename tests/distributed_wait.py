"""Run by tests/test_distributed.py under torchrun (2 processes on 127.0.0.1), with collectives that time out
after 1 s: process 0 works alone for 3 s (as it does writing a stage's files or measuring latency), and the
other waits for it at Runtime.barrier. Each process writes OUT/rank<R>.json once past it."""
import json
import os
import sys
import time

import torch

from distill.engine.runtime import Runtime


def main(out: str) -> None:
    rt = Runtime.from_name("cpu", timeout_s=1)
    if rt.is_main:
        time.sleep(3)
    rt.barrier()
    total = rt.sum(torch.ones(1))  # (the training group still works after the wait)
    with open(os.path.join(out, f"rank{rt.rank}.json"), "w") as fh:
        json.dump({"sum": float(total)}, fh)
    rt.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
