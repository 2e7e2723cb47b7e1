"""The test split, touched once per model, for the models selected on validation: metrics.json, and for a
teacher-assistant chain the decay per generation (chain.json)."""
from __future__ import annotations

from typing import Any, Dict

from .. import chain
from ..evaluate import evaluate_model
from ..tasks import task_for
from ..io import write_json
from ..roles import SCRATCH, STUDENT, TEACHER
from .artifacts import TIMINGS, load_saved, require_same_data, require_saved
from .rundir import RunDir, recipe_key, require_current


def evaluated(cfg: Dict[str, Any]) -> list:
    """The models a finished run has: the teacher, any assistants, the baseline (unless skipped), the student."""
    return [TEACHER, *chain.names(cfg), *([SCRATCH] if cfg["baseline"] else []), STUDENT]


def evaluate(run: RunDir) -> Dict[str, Any]:
    ecfg = run.cfg["evaluate"]
    stages, key, made_for = run.stages(), recipe_key(run.cfg), run.folder_recipe_key()
    replaced = run.measuring_changes()
    metrics, models = {}, {}
    for name in evaluated(run.cfg):
        data = run.data_for(name)  # (a student may read its own tokens)
        require_same_data(run.out, name, data)
        path = require_saved(run.out, name)
        require_current(run.out, name, path, "evaluate", made_for)
        model = load_saved(run, name).to(run.runtime.device)  # (scored there; evaluate_model times it on the CPU)
        models[name] = model
        m = evaluate_model(model, path, data.x_test, data.y_test, ecfg,
                           run.cfg["data"]["eval_batch_size"], run.runtime, task_for(data))
        if name != TEACHER and data is run.data and hasattr(task_for(data), "agreement") and run.runtime.is_main:
            teacher = models[TEACHER].to(run.runtime.device)
            m.update(task_for(data).agreement(teacher, model.to(run.runtime.device), data.x_test, data.y_test,
                                              run.cfg["data"]["eval_batch_size"]))
            teacher.cpu(), model.cpu()
        run.runtime.barrier()  # (the others wait while the main process measures speed and exact match alone)
        extra = stages.get(name, {})
        # (the fingerprint: which version of the model this measured; require_run compares it with stages.json)
        m.update({k: extra[k] for k in ("val_accuracy", "selected_epoch", *TIMINGS, "fingerprint") if k in extra})
        m["recipe"] = key
        metrics[name] = m
    if not run.cfg["baseline"]:
        metrics[SCRATCH] = {"skipped": True}  # baseline: false; tables, report and doctor say so
    if not run.runtime.is_main:
        return metrics
    run.open()
    if replaced:
        run.restamp(replaced)
    write_json(run.path("metrics.json"), metrics)
    chain.report(run, metrics, models)  # chain.json: accuracy and retention per generation, when there are assistants
    return metrics
