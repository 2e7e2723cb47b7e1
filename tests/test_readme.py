"""README.md opens with the two commands, and CI runs the second one verbatim."""
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme_commands():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    start = lines.index("```bash")
    return lines[start + 1:start + 3]


def test_readme_opens_with_install_run_and_test_commands():
    install_run, test = readme_commands()
    assert "pip install" in install_run and install_run.endswith("distill run")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert readme_commands()[1] in ci


def test_the_readme_recipe_runs_as_written(tmp_path):
    """The annotated recipe under "Recipes" is one a reader copies: it validates, and it runs (1 epoch each)."""
    from distill import Recipe, run
    text = open(os.path.join(ROOT, "README.md")).read().split("## Recipes", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "r.yaml").write_text(block)
    recipe = Recipe.load(str(tmp_path / "r.yaml"), ["teacher.train.epochs=1", "train.epochs=1",
                                                    "evaluate.latency_runs=2"])
    metrics = run(recipe, out=str(tmp_path / "run"), echo=lambda m: None)
    assert {"teacher", "student", "student_scratch"} <= set(metrics) and 0 < metrics["student"]["accuracy"] <= 1
