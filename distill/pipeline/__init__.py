"""The pipeline: a recipe becomes a plan of stages on one run folder.

    rundir     the folder: recipe.yaml, stages.json, log.jsonl, events (builds nothing)
    artifacts  what a stage leaves: models by kind (registry file or Hugging Face folder), with preprocessing
    stage      the one stage mechanism: fingerprint -> reuse | build -> train -> save -> mark
    training   the stages that train: teacher, assistants, the scratch baseline, the distilled student
    evaluation the test split, once per model
    plan       the recipe's stages in order; `run` executes them
"""
