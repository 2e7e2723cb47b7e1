"""Run by tests/test_distributed.py under torchrun (2 processes on 127.0.0.1): checks that need a live process
group, each process writing what it saw to OUT/rank<R>.json."""
import json
import os
import sys

import torch

from distill.data import load_data
from distill.engine.inference import predict
from distill.engine.objective import Objective
from distill.engine.runtime import Runtime
from distill.engine.trainer import Trainer
from distill.errors import UserError
from distill.models import mlp
from distill.recipe import Recipe
from distill.teachers.cache import same_key_everywhere


class CountingTrainer(Trainer):
    """Counts the gradient all-reduces DistributedDataParallel makes (one per bucket per synchronised step)."""
    allreduces = 0

    def _wrap(self, objective):
        model = super()._wrap(objective)

        def hook(state, bucket):
            CountingTrainer.allreduces += 1
            fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / torch.distributed.get_world_size())
        model.register_comm_hook(None, hook)
        return model


def main(out: str) -> None:
    rt = Runtime.from_name("cpu", timeout_s=60)
    seen = {"rank": rt.rank, "world": rt.world_size}

    # evaluation: 7 rows over 2 processes, gathered once each, as one process predicts them
    torch.manual_seed(0)
    model = mlp((5,), 3, hidden=[4])
    x = torch.randn(7, 5)
    gathered = predict(model, x, 2, rt)
    seen["rows"] = len(gathered)
    seen["same_as_one_process"] = bool(torch.equal(gathered, predict(model, x, 2)))

    # a process whose cache key differs from rank 0's refuses
    try:
        same_key_everywhere(f"key-of-rank-{rt.rank}", rt)
        seen["mismatch"] = None
    except UserError as e:
        seen["mismatch"] = str(e)
    from distill.teachers.cache import same_folder_everywhere  # (a cache folder each machine has its own of)
    same_folder_everywhere(os.path.join(sys.argv[1], "shared_cache"), rt)  # (one all see: nothing said)
    blocker = os.path.join(sys.argv[1], "a_file")  # a folder the main process cannot write in (a read-only
    if rt.is_main:  # cache, read as it is): no check, and no process is left waiting for the others
        open(blocker, "w").close()
    rt.barrier()
    same_folder_everywhere(os.path.join(blocker, "cache"), rt)
    seen["unwritable"] = "passed"
    try:
        same_folder_everywhere(os.path.join(sys.argv[1], f"cache_of_rank_{rt.rank}"), rt)
        seen["unshared"] = None
    except UserError as e:
        seen["unshared"] = str(e)
    from distill.teachers.topk import load_or_build  # (the top-k cache checks the same, naming itself)
    try:
        load_or_build(None, torch.zeros(2, 3), torch.zeros(2, 3), os.path.join(sys.argv[1], "topk"),
                      {"format": 1, "teacher": f"t{rt.rank}"}, 2, rt)
    except UserError as e:
        seen["topk_mismatch"] = str(e)

    # accumulation: gradients are synchronised once per optimizer step, not once per micro-batch
    recipe = Recipe.load("breast_cancer", ["train.epochs=1", "train.accumulate=2", "data.batch_size=32"])
    data = load_data(recipe.cfg["data"])
    student = mlp(data.input_shape, data.num_classes, hidden=[8])
    trainer = CountingTrainer("student", Objective(student), data, recipe.cfg["data"], recipe.cfg["student"]["train"],
                              runtime=rt)
    trainer.fit()
    seen["steps"], seen["allreduces"] = trainer.prog["step"], CountingTrainer.allreduces
    with open(os.path.join(out, f"rank{rt.rank}.json"), "w") as fh:
        json.dump(seen, fh)
    torch.distributed.barrier()  # (neither tears the group down while the other is still in a collective)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
