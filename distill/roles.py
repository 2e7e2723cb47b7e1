"""The names of the models a run makes, in one place: stage names, file names and log names derive from here.

    teacher          the teacher (trained here or loaded)
    assistant_<i>    teacher assistants, i = 1, 2, ... (teacher -> assistant_1 -> ... -> student)
    student_scratch  the student trained without a teacher: the no-distillation baseline
    student          the distilled student
    compress/<step>  a model made by a `distill compress` step (logged as compress_<step>)
"""
from __future__ import annotations

from typing import Any, Dict, List

TEACHER = "teacher"
STUDENT = "student"
SCRATCH = "student_scratch"
MODELS_OUT = (TEACHER, STUDENT, SCRATCH)  # every finished run has these three (the baseline unless skipped)
ASSISTANT_PREFIX = "assistant_"
COMPRESS_DIR = "compress"


def assistant(i: int) -> str:
    """The i-th assistant (0-based index into `distill.assistants`)."""
    return f"{ASSISTANT_PREFIX}{i + 1}"


def assistant_names(cfg: Dict[str, Any]) -> List[str]:
    """`assistant_1`, ... for the recipe's chain (none without `distill.assistants`)."""
    a = cfg["distill"].get("assistants") or []
    return [assistant(i) for i in range(1 if a == "auto" else len(a))]


def is_assistant(name: str) -> bool:
    return name.startswith(ASSISTANT_PREFIX)


def compressed(step: str) -> str:
    """The stage and folder name of a compress step's model."""
    return f"{COMPRESS_DIR}/{step}"


def log_name(name: str) -> str:
    """The `model` field of a stage's log lines (compress/<step> -> compress_<step>)."""
    return name.replace("/", "_")


def recipe_section(role: str) -> str:
    """The recipe section whose `train` settings a model uses: the teacher's own, else the student's
    (assistants and compress fine-tunes train with the student's budget)."""
    return TEACHER if role == TEACHER else STUDENT


def stage_command(name: str) -> str:
    """The `distill` stage command that makes the model `name`."""
    return "train-teacher" if name == TEACHER else "compress" if name.startswith(COMPRESS_DIR) else "train-student"
