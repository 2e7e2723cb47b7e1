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
