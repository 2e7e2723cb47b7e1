"""Run by tests/test_distributed.py under torchrun (2 processes on 127.0.0.1), with collectives that time out
after 1 s: process 0 works alone for 3 s (as it does writing a stage's files or measuring latency), and the
other waits for it at Runtime.barrier; then process 0 writes a checkpoint for 3 s in training, and the other
waits for it too, and learns its path. Each process writes OUT/rank<R>.json once past them."""
import json
import os
import sys
import time

import torch

from distill.engine.callbacks import Checkpointing
from distill.engine.runtime import Runtime


class SlowDisk:
    def save(self, step, state):
        time.sleep(3)
        return f"checkpoints/step-{step:08d}.pt"


class Trainer:
    prog = {"step": 7}

    def __init__(self, runtime):
        self.runtime = runtime

    def state(self):
        return {}


def main(out: str) -> None:
    rt = Runtime.from_name("cpu", timeout_s=1)
    if rt.is_main:
        time.sleep(3)
    rt.barrier()
    total = rt.sum(torch.ones(1))  # (the training group still works after the wait)
    path = Checkpointing(SlowDisk(), is_main=rt.is_main).save(Trainer(rt))
    total = total + rt.sum(torch.ones(1))
    with open(os.path.join(out, f"rank{rt.rank}.json"), "w") as fh:
        json.dump({"sum": float(total), "checkpoint": path}, fh)
    rt.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
