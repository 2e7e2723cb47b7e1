"""`distill report RUN_DIR`: one self-contained HTML file (no network references, every image a data URI) with
every section, which headless Chromium renders to a non-blank page; bad run folders are one-line errors."""
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from distill import Recipe, run
from distill.cli import main

HEADINGS = ["Summary", "Training curves", "Knowledge retention", "Gradient consistency", "Monitor adjustments",
            "Confusion matrices", "Compression", "Teacher-assistant chain"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models train several times faster on one thread than on a busy machine's many."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny real digits run with one feature pair (so retention per layer exists) and a retention rule that
    always fires (so the monitor adjusts every epoch); plus a compress/bench record and a chain.json in the
    formats distill writes, so the optional sections render too (their numbers are made up)."""
    recipe = Recipe.load("digits", ["train.epochs=2", "teacher.train.epochs=1", "data.train_subset=400",
                                    "teacher.args={channels: [8, 16], hidden: 32}",
                                    "student.args={channels: [4, 8], hidden: 16}",
                                    "distill.features=[{teacher: body.3, student: body.3, loss: mse}]",
                                    "monitor.retention_min=0.999", "monitor.action=lower_temperature",
                                    "distill.temperature=4", "description=<script>alert(1)</script> & more"])
    out = str(tmp_path_factory.mktemp("report") / "run")
    run(recipe, out, echo=lambda m: None)
    _fake_optional_files(out)
    return out


def _fake_optional_files(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(out, "bench"))
    os.makedirs(os.path.join(out, "compress"))
    plt.imsave(os.path.join(out, "bench", "pareto.png"), [[0.0, 1.0], [1.0, 0.0]])
    row = {"accuracy": 0.9, "accuracy_change": 0.0, "params": 1034, "size_bytes": 5136, "p50_ms": 0.05,
           "p95_ms": 0.07, "speedup": 1.0, "throughput": 2e5, "peak_mb": 3.0}
    bench = {"machine": {"cpu": "test cpu", "cores": 2, "torch": "x", "onnxruntime": None}, "threads": 1,
             "batch": 32, "latency_runs": 10,
             "results": [{"model": "student", "variant": "fp32", **row},
                         {"model": "student", "variant": "onnx", "error": "n/a: <not installed>"}],
             "recommended": {"model": "student", "variant": "fp32", "file": "student.safetensors"}}
    with open(os.path.join(out, "bench", "bench.json"), "w") as fh:
        json.dump(bench, fh)
    with open(os.path.join(out, "compress", "compress.json"), "w") as fh:
        json.dump({"source": "student", "steps": ["channels"], "models": [
            {"name": "channels", "path": "x", "params": 800, "size_bytes": 4000, "val_accuracy": 0.5, "time_s": 1}]},
            fh)
    gens = [{"name": "teacher", "params": 3658, "val_accuracy": 0.6, "test_accuracy": 0.58, "retention_cka": 1.0},
            {"name": "assistant_1", "params": 2000, "val_accuracy": 0.5, "test_accuracy": 0.5, "retention_cka": 0.8},
            {"name": "student", "params": 1034, "val_accuracy": 0.3, "test_accuracy": 0.3, "retention_cka": 0.6}]
    decay = [{"from": a["name"], "to": b["name"], "accuracy_drop": 100 * (a["test_accuracy"] - b["test_accuracy"]),
              "decay_rate": 0.1, "retention_drop": a["retention_cka"] - b["retention_cka"]}
             for a, b in zip(gens, gens[1:])]
    with open(os.path.join(out, "chain.json"), "w") as fh:
        json.dump({"generations": gens, "decay": decay}, fh)


@pytest.fixture(scope="module")
def report_html(run_dir):
    assert main(["report", run_dir]) == 0
    path = os.path.join(run_dir, "report.html")
    return path, open(path, encoding="utf-8").read()


def test_report_is_self_contained_with_every_section(report_html):
    path, page = report_html
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page, flags=re.I)
    assert refs and not [r for r in refs if not (r.startswith("#") or r.startswith("data:image/png;base64,"))]
    assert not re.search(r"https?://", page) and "<link" not in page and "<script" not in page
    imgs = re.findall(r"<img[^>]*>", page)
    assert len(imgs) >= 7 and all('src="data:image/png;base64,' in i for i in imgs)
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page  # text from files is escaped
    assert "n/a: &lt;not installed&gt;" in page
    assert "<dt>features</dt><dd>body.3 → body.3 (mse)</dd>" in page  # the feature pair, teacher → student
    assert "<dt>distillation</dt><dd>kd, T = " in page  # (the method: a dkd or dist run read as plain KD)
    assert "temperature: 4 → 2.667" in page  # the monitor's first adjustment, before → after
    assert "fewer parameters than the teacher" in page and "of the teacher&#x27;s test accuracy" in page


def test_out_option_writes_elsewhere(run_dir, tmp_path, capsys):
    out = str(tmp_path / "sub" / "r.html")
    assert main(["report", run_dir, "--out", out]) == 0
    assert os.path.isfile(out) and out in capsys.readouterr().out


def _chromium(*args, user_dir):
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_chromium_renders_the_report(report_html, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    import numpy as np
    from PIL import Image
    path, _ = report_html
    url = "file://" + os.path.abspath(path)
    shot = str(tmp_path / "shot.png")
    _chromium("--window-size=1280,2400", f"--screenshot={shot}", url, user_dir=str(tmp_path / "profile"))
    assert os.path.isfile(shot)
    with open(shot, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    img = Image.open(shot)
    assert img.size == (1280, 2400)
    px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    dark = (px.min(1) < 240).reshape(2400, 1280)
    # text and plots, not a blank page: ink on 3-5% of the pixels (fonts and versions vary), over much of the page
    assert dark.mean() > 0.02 and dark.any(1).mean() > 0.4
    assert len(np.unique(px[::7], axis=0)) > 200  # plots in colour, not one flat error page
    dom = _chromium("--dump-dom", url, user_dir=str(tmp_path / "profile")).stdout
    for h in HEADINGS:
        assert re.search(rf"<h2>{re.escape(h)}</h2>", dom), h


def _one_line_error(capsys, argv, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err


def test_bad_run_folders_are_one_line_errors(tmp_path, capsys, run_dir):
    _one_line_error(capsys, ["report", str(tmp_path / "nope")], "not a run folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["report", str(tmp_path / "empty")], "no recipe.yaml")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(os.path.join(run_dir, "recipe.yaml"), half)
    _one_line_error(capsys, ["report", str(half)], f"the run is not finished: distill run {half} finishes it")
    (half / "summary.json").write_text("{}")
    _one_line_error(capsys, ["report", str(half)], "a multi-seed run: report one seed folder, e.g. seed_0")
    (half / "metrics.json").write_text("{not json")
    _one_line_error(capsys, ["report", str(half)], "metrics.json: not readable JSON")
    (half / "metrics.json").write_text("[1, 2]")
    _one_line_error(capsys, ["report", str(half)], "metrics.json: holds list, not a JSON object")
    (half / "metrics.json").write_text("null")  # (was read as "no file": a traceback)
    _one_line_error(capsys, ["report", str(half)], "metrics.json: holds NoneType, not a JSON object")
    (half / "metrics.json").write_text('{"teacher": {"accuracy": "high"}}')
    _one_line_error(capsys, ["doctor", str(half)], "metrics.json: teacher: 'accuracy' is not a number")
    assert not (half / "report.html").exists()


def test_hand_edited_records_of_other_shapes_are_left_out_not_a_traceback(run_dir, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(run_dir, folder)
    metrics = json.load(open(folder / "metrics.json"))
    metrics["teacher"]["accuracy"] = None
    metrics["student_scratch"] = [1]
    json.dump(metrics, open(folder / "metrics.json", "w"))
    (folder / "compress" / "compress.json").write_text('{"models": ["x"]}')
    with open(folder / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"model": "student", "epoch": 3, "loss_total": "abc", "val_accuracy": [1]}) + "\n")
    assert main(["report", str(folder)]) == 0
    assert main(["doctor", str(folder)]) == 0


def test_summary_without_accuracy_and_a_language_model_s_bench_in_its_own_columns(run_dir, tmp_path):
    """evaluate.metrics without accuracy left the summary table empty; an LM's bench rows (perplexity, ms per
    token, tokens/s) were shown under the classifier's columns (accuracy, p50 ms, samples/s)."""
    folder = tmp_path / "f1"
    shutil.copytree(run_dir, folder)
    metrics = json.load(open(folder / "metrics.json"))
    for m in metrics.values():
        m.pop("accuracy", None)
    json.dump(metrics, open(folder / "metrics.json", "w"))
    bench = {"language_model": True, "threads": 1, "batch": 4, "latency_runs": 2, "decode_tokens": 16,
             "machine": {}, "results": [{"model": "student", "variant": "fp32", "perplexity": 3.25, "accuracy": 0.5,
                                         "p50_ms": 1.5, "throughput": 321.5, "prefill_ms": 7.25}]}
    os.makedirs(folder / "bench", exist_ok=True)
    json.dump(bench, open(folder / "bench" / "bench.json", "w"))
    assert main(["report", str(folder)]) == 0
    html = (folder / "report.html").read_text()
    summary = html[html.index("<table>"):html.index("</table>")]
    assert "macro-F1" in summary and f"{metrics['student']['macro_f1']:.4f}" in summary
    for header in ("perplexity", "ms/token p50", "tokens/s", "prefill ms"):
        assert f"<th>{header}</th>" in html, header
    assert "321.5" in html and "greedy decoding with the KV cache, 16 new tokens" in html


def test_without_matplotlib_it_says_so_in_one_line(run_dir, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    _one_line_error(capsys, ["report", run_dir, "--out", str(tmp_path / "r.html")], "pip install -e \".[plot]\"")
    assert not (tmp_path / "r.html").exists()


def test_missing_models_leave_a_note_not_a_failure(run_dir, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in ("recipe.yaml", "metrics.json", "log.jsonl"):
        shutil.copy(os.path.join(run_dir, f), folder)
    assert main(["report", str(folder)]) == 0
    page = open(folder / "report.html", encoding="utf-8").read()
    assert "Not available:" in page and "teacher (.safetensors, or a Hugging Face folder): missing" in page
    assert "Compression" not in page and "Teacher-assistant chain" not in page


def test_a_run_without_a_baseline_has_confusion_matrices_and_no_baseline_left_from_before(run_dir, tmp_path):
    """As a rerun with --no-baseline leaves it: the old baseline's file and log lines, metrics saying skipped."""
    folder = str(tmp_path / "nobase")
    shutil.copytree(run_dir, folder)
    recipe = yaml.safe_load(open(os.path.join(folder, "recipe.yaml")))
    recipe["baseline"] = False
    yaml.safe_dump(recipe, open(os.path.join(folder, "recipe.yaml"), "w"))
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    metrics["student_scratch"] = {"skipped": True}
    json.dump(metrics, open(os.path.join(folder, "metrics.json"), "w"))
    from distill.doctor import RunView
    assert "student_scratch" in json.load(open(os.path.join(folder, "stages.json")))  # (its log lines are there)
    assert "student_scratch" not in RunView(folder).epochs  # (the doctor reads none of them: not this run's)
    os.remove(os.path.join(folder, "student_scratch.safetensors"))  # (as a run that never had one)
    assert main(["report", folder]) == 0
    page = open(os.path.join(folder, "report.html"), encoding="utf-8").read()
    section = page[page.index("Confusion matrices"):]
    assert "Not available" not in section[:400] and "confusion matrices" in section


def test_the_settings_name_the_method_and_its_own_settings():
    from distill.recipe import Recipe as R
    from distill.report import settings_list
    page = settings_list(R.load("digits", ["distill.method=dkd", "distill.logit_standardize=true"]))
    assert '<dd>dkd {&quot;alpha&quot;: 1.0, &quot;beta&quot;: 8.0, &quot;warmup_epochs&quot;: 20}, logits standardised, ' \
           'T = 2.0, alpha = 0.9</dd>' in page, page
    assert "<dd>jsd {&quot;beta&quot;: 0.5}, T = " in settings_list(R.load("digits", ["distill.method=jsd"]))
    assert "data distillation" not in page  # (its defaults: nothing on)
    text = R.load("digits")  # (the settings of a text recipe, without its files)
    text.cfg["distill"]["data"].update(mask=True, eda=2, unlabeled="u.txt")
    assert "<dt>data distillation</dt><dd>mask = True, mask_fraction = 0.15, teacher_sees = clean, eda = 2, " \
           "word_prob = 0.15, unlabeled = u.txt</dd>" in settings_list(text), settings_list(text)


def test_the_headline_says_no_share_of_an_accuracy_that_is_not_a_number():
    from distill.report import headline
    nan = float("nan")
    models = {"teacher": {"params": 800, "accuracy": nan}, "student": {"params": 100, "accuracy": 0.6},
              "student_scratch": {"params": 100, "accuracy": 0.5}}
    assert headline(models) == "The distilled student has 8.0× fewer parameters than the teacher (100 vs 800)."
    models["teacher"]["accuracy"], models["student_scratch"]["accuracy"] = 0.8, nan
    assert headline(models).endswith("keeps 75.0% of the teacher's test accuracy (0.6000 vs 0.8000).")


def test_sample_generations_keep_their_whitespace_and_say_where_a_prompt_is_cut():
    from distill.report import generations_section
    sample = {"prompt": "x" * 130 + "Compute 7 + 5.", "reference": "7+5: ones 12\nAnswer: 12",
              "completion": " 12"}
    page = generations_section({"student": {"samples": [sample], "exact_match": None},
                                "teacher": {"samples": [sample], "exact_match": 1.0}})
    assert '<div class="texts"><table>' in page and "Answer: 12" in page and "<td> 12</td>" in page
    assert "<td>…" + "x" * 106 + "Compute 7 + 5.</td>" in page
    assert "scored: teacher 1.00." in page  # (a hand-edited null is left out, not a traceback)


def test_many_layer_pairs_become_a_heatmap_and_empty_logs_a_note(monkeypatch):
    from distill.plots import pyplot
    from distill.report import gradient_section, retention_section
    plt = pyplot()
    recs = [{"epoch": e, **{f"retention_cka/t{i}->s{i}": 0.5 + 0.04 * i for i in range(12)},
             **{f"grad_kd_ce_cos/m{i}": -0.5 + 0.1 * i for i in range(12)}} for e in (1, 2, 3)]
    n = len(plt.get_fignums())
    assert retention_section(plt, recs).startswith('<img alt="knowledge retention per layer"')
    assert gradient_section(plt, recs, []).startswith('<img alt="gradient consistency"')
    assert len(plt.get_fignums()) == n  # figures are closed once embedded
    assert "logged no retention" in retention_section(plt, [{"epoch": 1}])
    assert "logged no gradient consistency" in gradient_section(plt, [{"epoch": 1}], [])
    # measured every third epoch: a column per measured epoch, as wide as the gap (not blank stripes between)
    import distill.plots
    import distill.report
    from distill.plots import heatmap, series_panel
    keys = [f"grad_kd_ce_cos/m{i}" for i in range(12)]
    every_third = [{"epoch": e, **({k: 0.1 for k in keys} if e % 3 == 1 else {})} for e in range(1, 11)]
    drawn = []
    for module in (distill.report, distill.plots):  # (the report's own call, and series_panel's)
        monkeypatch.setattr(module, "heatmap", lambda ax, *a: (drawn.append(ax), heatmap(ax, *a))[1])
    gradient_section(plt, every_third, [])  # (the gradient section's heatmap and the retention section's)
    retention_section(plt, [{"epoch": r["epoch"], **{k.replace("grad_kd_ce_cos/", "retention_cka/"): v
                                                     for k, v in r.items() if k != "epoch"}} for r in every_third])
    assert len(drawn) == 2
    fig, ax = plt.subplots()
    series_panel(ax, every_third, keys, "t", "grad_kd_ce_cos/")
    mesh = ax.collections[0]
    assert mesh.get_array().shape == (12, 4) and not mesh.get_array().mask.any()
    assert ax.get_xlim() == (0.5, 11.5)
    plt.close(fig)
    fig, ax = plt.subplots()  # (one measured epoch)
    series_panel(ax, [{"epoch": 2, **{k: 0.1 for k in keys}}], keys, "t", "grad_kd_ce_cos/")
    assert ax.get_xlim() == (1.5, 2.5)
    plt.close(fig)


def test_log_keeps_the_last_attempt_of_each_epoch(tmp_path):
    from distill.logbook import read_log
    lines = [{"model": "student", "epoch": 1, "val_accuracy": 0.1},  # a first training, later repeated
             {"model": "student", "epoch": 2, "val_accuracy": 0.2},
             {"model": "student", "epoch": 3, "val_accuracy": 0.3},
             {"event": "message"},
             {"model": "student", "epoch": 1, "val_accuracy": 0.5},
             {"model": "student", "epoch": 2, "val_accuracy": 0.6},
             {"model": "student", "epoch": 2, "val_accuracy": 0.7},  # resumed: epoch 2 again
             {"model": "student", "epoch": 1, "step": 10, "loss_total": 1.0},
             {"model": "student", "epoch": "x", "val_accuracy": 0.9},  # not lines distill writes: passed over
             {"model": "student", "epoch": 1, "step": "y", "loss_total": 2.0}]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{cut sho")
    epochs, steps = read_log(str(path))
    assert [(r["epoch"], r["val_accuracy"]) for r in epochs["student"]] == [(1, 0.5), (2, 0.7)]
    assert [r["step"] for r in steps["student"]] == [10]


def test_metrics_under_another_recipe_than_the_folder_s_are_out_of_date(tmp_path):
    """A rerun that rewrote recipe.yaml and stopped before it retrained any model (its records unchanged)."""
    from distill import Recipe
    from distill.pipeline.rundir import metrics_out_of_date, recipe_key
    recipe = Recipe.load("digits")
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    (tmp_path / "stages.json").write_text(json.dumps({"student": {"fingerprint": "a"}}))
    same = {"student": {"fingerprint": "a", "recipe": recipe_key(recipe.cfg)}}
    assert metrics_out_of_date(str(tmp_path), same) is None
    other = {"student": {"fingerprint": "a", "recipe": "0" * 16}}
    assert "measured under another recipe than its recipe.yaml" in metrics_out_of_date(str(tmp_path), other)


def test_a_language_models_headline_compares_its_task_metric_or_loss_not_next_token_accuracy():
    from distill.report import headline
    lm = {"teacher": {"params": 800, "accuracy": 0.6, "bpc": 1.5, "perplexity": 2.8},
          "student": {"params": 100, "accuracy": 0.55, "bpc": 1.8, "perplexity": 3.5},
          "student_scratch": {"params": 100, "accuracy": 0.5, "bpc": 1.9, "perplexity": 3.7}}
    assert headline(lm).endswith("its test bits per character is 1.8000 against the teacher's 1.5000; the same "
                                 "student trained without distillation has 1.9000.")
    for m, em in zip(lm.values(), (0.9, 0.6, 0.3)):  # exact match, the task's own measure, comes first
        m["exact_match"] = em
    assert "keeps 66.7% of the teacher's test exact match (0.6000 vs 0.9000); the same student trained " \
           "without distillation keeps 33.3%." in headline(lm)
    lm["teacher"]["exact_match"] = 0.0  # (no share of nothing: the next measure)
    assert "bits per character is 1.8000" in headline(lm)


def test_a_compress_that_stopped_midway_is_said_with_the_command_that_continues(run_dir, tmp_path):
    import shutil
    from distill.report import compression_section
    folder = shutil.copytree(run_dir, str(tmp_path / "r"))
    path = os.path.join(folder, "compress", "compress.json")
    record = json.load(open(path))
    for finished, said in ((False, True), (True, False), (None, False)):  # (None: a record from before the flag)
        json.dump({**record, **({} if finished is None else {"finished": finished})}, open(path, "w"))
        page = compression_section(folder)
        assert ("This compress stopped before its last step; continue with `distill compress " in page) == said
        assert f"{folder} --resume`" in page or not said
