"""The one stage mechanism: fingerprint -> reuse | build -> train -> save -> mark.

A stage names its inputs (hashed into a fingerprint with the code version), the files it leaves, and the work
that makes them. When `stages.json` holds the same fingerprint and the files exist, the work is skipped and
the record reused (the teacher is not retrained). Otherwise the work runs and the stage is marked done,
which also removes its checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence

from .. import __version__
from ..engine.trainer import stop_if_asked
from ..io import sha256_json
from .rundir import RunDir


@dataclass
class Stage:
    name: str  # a role (teacher, student, assistant_1, ...) or compress/<step>
    inputs: Dict[str, Any]  # everything the outputs depend on
    outputs: Sequence[str]  # files or folders in the run folder
    make: Callable[[], Dict[str, Any]]  # builds, trains and saves the outputs; returns what to record


# Inputs that came later than the folders they are read in, hashed without them too: a record or checkpoints
# of that earlier fingerprint are this stage's, so that those folders are not trained again, or refused
# --resume, for a key they could not hold. (The record keeps its fingerprint, which metrics.json, compress.json
# and bench rows name: such a stage is judged as before, by the other inputs, until it is trained again.)
LATER_KEYS = ("hf_files", "teacher_hf_files")  # (the content of teacher.hf / student.hf: 2026-12-07)


def _without_later_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_later_keys(v) for k, v in value.items() if k not in LATER_KEYS}
    return [_without_later_keys(v) for v in value] if isinstance(value, list) else value


def run_stage(run: RunDir, stage: Stage) -> Dict[str, Any]:
    """Run (or reuse) `stage`; returns its record in stages.json, with `reused` saying which."""
    fingerprint = sha256_json({**stage.inputs, "version": __version__})
    earlier = sha256_json({**_without_later_keys(stage.inputs), "version": __version__})
    # Under torchrun every process runs every stage (training is shared out): the main process decides whether
    # the stage is reused, and the others wait until it has written the stage's files before reading them.
    done = run.runtime.from_main(run.stage_done(stage.name, fingerprint, stage.outputs)
                                 or (earlier != fingerprint and run.stage_done(stage.name, earlier, stage.outputs))
                                 or None)
    if done and done.pop("remembered", False):  # (a search's trial finished earlier: its files are another's)
        run.event(f"{stage.name}: inputs unchanged, reusing its result in an earlier trial", model=stage.name)
        return _recorded(run, stage.name, {**done, "reused": True})
    if done:
        run.event(f"{stage.name}: inputs unchanged, reusing {stage.outputs[0]}", model=stage.name)
        run.mark_reused(stage.name)
        if done.get("fingerprint"):
            run.remove_checkpoints(stage.name, written_by=done["fingerprint"])
        return _recorded(run, stage.name, {**done, "reused": True})
    run.check_checkpoints(stage.name, fingerprint, earlier)  # (before open rewrites recipe.yaml)
    run.fingerprints[stage.name] = fingerprint  # (its checkpoints carry it)
    run.open()
    run.mark_unfinished(stage.name)
    info = stage.make()
    if run.runtime.is_main:  # (which rows were in which split: evaluate, compress, bench and export compare it)
        info = {**info, "data_split": run.data_for(stage.name).split_fingerprint}
    run.mark_done(stage.name, fingerprint, info)
    run.runtime.barrier()
    record = _recorded(run, stage.name, {"fingerprint": fingerprint, **info, "reused": False})
    stop_if_asked(stage.name, run.runtime)
    return record


def _recorded(run: RunDir, name: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """`record`, kept as this process's record of stage `name` (a search's pruned trial reads its own)."""
    run.records[name] = record
    return record
