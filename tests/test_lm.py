"""Causal language modelling on the one engine: character data cut into shifted windows, the registry's GPT
(causal: no position sees a later one), every token divergence as `distill.method` from a recipe, selection
by validation loss, bits per character on the test split, and bitwise resume."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill import Recipe, run
from distill.data import load_data
from distill.models import build_model

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 30


def recipe(tmp, **over):
    (tmp / "text.txt").write_text(TEXT, encoding="utf-8")
    r = {"name": "lm", "data": {"dataset": "text_lm", "path": str(tmp / "text.txt"), "max_length": 24,
                                "val_fraction": 0.1, "test_fraction": 0.1, "batch_size": 16},
         "teacher": {"model": "gpt", "args": {"layers": 2, "width": 32, "heads": 4}, "train": {"epochs": 2}},
         "student": {"model": "gpt", "args": {"layers": 1, "width": 16, "heads": 2}, "train": {"epochs": 2}},
         "distill": {"method": "forward_kl", "temperature": 1.0, "alpha": 0.5},
         "train": {"optimizer": {"lr": 0.003}}, "monitor": {"gradients": False},
         "evaluate": {"latency_runs": 2}, "output": {"dir": str(tmp / "run")}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp / "lm.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def test_windows_are_the_text_in_order_with_targets_shifted_by_one(tmp_path):
    data = load_data(Recipe.load(recipe(tmp_path)).cfg["data"])
    vocab = data.class_names
    assert vocab == sorted(set(TEXT)) and data.num_classes == len(vocab) and data.task == "causal_lm"
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert decode(data.x_train[0]) == TEXT[:24] and decode(data.y_train[0]) == TEXT[1:25]
    assert decode(data.x_train[1]) == TEXT[24:48]  # the next window starts where the last one's input ended
    n = len(TEXT)
    assert len(data.x_train) == (n - 2 * int(n * 0.1) - 1) // 24 and len(data.x_val) and len(data.x_test)
    assert decode(data.x_val[0]) == TEXT[n - 2 * int(n * 0.1):][:24]  # validation follows training, unshuffled


def test_gpt_is_causal_and_gives_logits_per_position():
    torch.manual_seed(0)
    model = build_model({"model": "gpt", "args": {"layers": 2, "width": 32, "heads": 4}}, (10,), 7).eval()
    x = torch.randint(0, 7, (2, 10))
    later = x.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 7  # change only positions 6..9
    a, b = model(x), model(later)
    assert a.shape == (2, 10, 7)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])
    assert model.generate(x[:, :3], 5, temperature=0).shape == (2, 8)


@pytest.mark.parametrize("method", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "kd"])
def test_every_token_method_distils_a_gpt_from_a_recipe(tmp_path, method):
    metrics = run(Recipe.load(recipe(tmp_path, distill={"method": method}, student={"train": {"epochs": 1}},
                                     teacher={"train": {"epochs": 1}})))
    for name in ("teacher", "student_scratch", "student"):
        m = metrics[name]
        assert 0 < m["bpc"] < 8 and m["perplexity"] == pytest.approx(2 ** m["bpc"], rel=1e-6)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    epochs = [r for r in log if r.get("model") == "student" and "val_loss" in r]
    assert epochs and all(r["loss_kd"] >= 0 and r["loss_kd"] == r["loss_kd"] for r in epochs)


def test_selected_by_validation_loss_and_the_student_learns_from_the_teacher(tmp_path):
    metrics = run(Recipe.load(recipe(tmp_path, teacher={"train": {"epochs": 8, "optimizer": {"lr": 0.01}}},
                                     student={"train": {"epochs": 6, "optimizer": {"lr": 0.01}}},
                                     distill={"alpha": 1.0})))  # alpha 1: the teacher alone teaches
    stages = json.load(open(tmp_path / "run" / "stages.json"))
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    val = {r["epoch"]: r["val_loss"] for r in log if r.get("model") == "teacher" and "val_loss" in r}
    assert stages["teacher"]["selected_epoch"] == min(val, key=val.get)
    # from the teacher's outputs only, the student gets far below a uniform guess (log2 of the vocabulary)
    assert metrics["student"]["bpc"] < 0.8 * torch.log2(torch.tensor(float(len(set(TEXT))))).item()
    # the doctor on a run whose teacher is loaded (no epoch lines: the training accuracy is computed, per token)
    from distill.cli import main
    other = tmp_path / "loaded"
    other.mkdir()
    run(Recipe.load(recipe(other, teacher={"checkpoint": str(tmp_path / "run" / "teacher.safetensors")},
                           student={"train": {"epochs": 1}})))
    assert main(["doctor", str(other / "run")]) == 0
    doctor = json.load(open(other / "run" / "doctor.json"))
    assert {"overconfident_soft_labels", "student_too_small", "overfitting"} <= set(doctor["ran"])
    metrics_file = other / "run" / "metrics.json"  # a teacher no better than scratch, said in what it measures
    m = json.load(open(metrics_file))
    m["teacher"]["accuracy"] = m["student_scratch"]["accuracy"]
    metrics_file.write_text(json.dumps(m))
    assert main(["doctor", str(other / "run")]) == 0
    [weak] = [f for f in json.load(open(other / "run" / "doctor.json"))["findings"] if f["rule"] == "weak_teacher"]
    assert weak["message"].startswith("the teacher's test next-token accuracy ")


def test_the_soft_label_entropy_is_over_the_vocabulary_at_the_positions_with_a_target():
    from distill.doctor import normalised_entropy
    sure = torch.full((2, 5, 7), -50.0)
    sure[..., 3] = 50.0  # one-hot over the vocabulary at every position
    assert normalised_entropy(sure, 1.0) < 1e-6
    mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
    flat = sure.clone()
    flat[:, 3:] = 0.0  # uniform at the positions without a target: not counted once they are left out
    assert normalised_entropy(flat[mask], 1.0) < 1e-6 and normalised_entropy(flat, 1.0) == pytest.approx(0.4)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_sigterm_then_resume_is_bitwise_identical(tmp_path, interval):
    # (with the lr moving every step, stopped within an epoch, the resumed schedule carries on from that step)
    path = recipe(tmp_path, student={"train": {"epochs": 6, "checkpoint_seconds": 0,
                                               "scheduler": {"name": "cosine", "interval": interval}}})
    env = {**os.environ, "DISTILL_QUIET": "1", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"  # (beside the stopped run: one thread each, on 2 cores)
    uncut = subprocess.Popen([sys.executable, "-m", "distill", "run", path, "--out", str(ref)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-m", "distill", "run", path, "--out", str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # stop the distilled student once its training has begun
            if line.startswith("student: teacher"):
                break
        while not list((out / "checkpoints").glob("student/step-*.pt")) and p.poll() is None:
            pass
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
    finally:
        if p.poll() is None:
            p.kill()
    stopped = max((out / "checkpoints").glob("student/step-*.pt"), key=os.path.getmtime)
    assert torch.load(stopped, weights_only=True)["progress"]["batch"] > 0  # (within an epoch)
    subprocess.run([sys.executable, "-m", "distill", "run", str(out), "--resume"], check=True, env=env,
                   capture_output=True, timeout=300)
    assert uncut.wait(timeout=300) == 0, uncut.stderr.read()
    a, b = load_file(ref / "student.safetensors"), load_file(out / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _refused(argv, capsys, message):
    from distill.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_language_model_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    path = recipe(tmp_path)
    out = ["--out", str(tmp_path / "bad")]
    _refused(["run", path, "--set", f"data.path={tmp_path / 'none.txt'}", *out], capsys, "data.path")
    _refused(["run", path, "--set", "data.sampling=stratified", *out], capsys,
             "data.sampling: 'stratified' does not apply to text_lm")
    _refused(["run", path, "--set", "distill.sequence_kd.windows=10", "--set", "distill.sequence_kd.prompt=24", *out],
             capsys, "distill.sequence_kd.prompt: 24 characters leave nothing for the teacher to write")
    _refused(["run", "digits", "--set", "distill.sequence_kd.windows=10", *out], capsys,
             "distill.sequence_kd.windows: teacher-written windows of text are for data.dataset: text_lm")
    _refused(["run", path, "--set", "distill.on_policy.fraction=0.5", *out], capsys,
             "distill.on_policy: the student completes prompts, so it is for prompt/completion data")
    for key in ("distill.sequence_kd.verify=true", "distill.sequence_kd.top_p=0.5", "distill.vocab_align=truncate"):
        _refused(["run", path, "--set", key, *out], capsys, f"{key.split('=')[0]}: does nothing for text_lm")
    (tmp_path / "short.txt").write_text("to be or not", encoding="utf-8")
    _refused(["run", path, "--set", "teacher.args.heads=0", *out], capsys,
             "teacher.args: heads must be a whole number >= 1, got 0 (model 'gpt')")
    _refused(["run", path, "--set", "student.args.layers=0", *out], capsys,
             "student.args: layers must be a whole number >= 1, got 0 (model 'gpt')")
    _refused(["run", path, "--set", "student.args.heads=3", *out], capsys,
             "student.args: width 16 is not divisible by heads 3 (model 'gpt')")
    _refused(["run", path, "--set", f"data.path={tmp_path / 'short.txt'}", *out], capsys,
             "the training split holds fewer than two windows of data.max_length + 1 = 25 characters")
    # a teacher trained on a text of other characters: its vocabulary is not the data's
    other = tmp_path / "other"
    other.mkdir()
    small = recipe(other, output={"dir": str(other / "run")})
    (other / "text.txt").write_text("abc " * 2000, encoding="utf-8")
    run(Recipe.load(small, ["teacher.train.epochs=1", "student.train.epochs=1"]))
    _refused(["run", path, "--set", f"teacher.checkpoint={other / 'run' / 'teacher.safetensors'}",
              "--set", "teacher.model=null", *out], capsys, "teacher.checkpoint")
    assert not (tmp_path / "bad").exists()


def test_exported_hf_folder_generates_the_same_greedy_text_in_plain_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    from distill.cli import main
    from distill.pipeline.artifacts import load_model_at
    path = recipe(tmp_path, teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    run(Recipe.load(path))
    folder = tmp_path / "hf_student"
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(folder)]) == 0
    prompt = "First Citizen:\n"
    ours = load_model_at(str(tmp_path / "run" / "student.safetensors"), "student")
    vocab = sorted(set(TEXT))
    ids = torch.tensor([[vocab.index(c) for c in prompt]])
    want = "".join(vocab[i] for i in ours.generate(ids, 8, temperature=0)[0].tolist())
    script = ("import sys, transformers as t\n"
              "tok = t.AutoTokenizer.from_pretrained(sys.argv[1]); m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
              "ids = tok(sys.argv[2], return_tensors='pt').input_ids\n"
              "out = m.generate(ids, attention_mask=ids * 0 + 1, max_new_tokens=8, do_sample=False, pad_token_id=0)\n"
              "sys.stdout.write(tok.decode(out[0]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = subprocess.run([sys.executable, "-c", script, str(folder), prompt], capture_output=True, text=True,
                         env={**env, "HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path), timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "distill" not in got.stderr and got.stdout == want
    # --out is replaced whole: an earlier export may be, a folder of other files or a file may not
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(folder)]) == 0
    assert {"config.json", "distill.json"} <= set(os.listdir(folder))
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".distill-tmp-", ".distill-old-"))]  # (the old one is gone)
    assert json.load(open(folder / "distill.json"))["export"] == "hf"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "model").mkdir()  # (a model folder copied out of a run: distill.json and config.json too)
    (tmp_path / "model" / "distill.json").write_text('{"spec": {"hf": "x"}}')
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')
    for out, message in ((tmp_path / "mine", "a folder that holds other files and is not an earlier --format hf "
                                              "export"), (tmp_path / "model", "is not an earlier --format hf export"),
                         (tmp_path / "lm.yaml", "a file; --format hf writes a folder"),
                         (tmp_path / "run", "part of the run folder")):
        before = sorted(os.listdir(out)) if out.is_dir() else out.read_bytes()
        capsys.readouterr()
        _refused(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(out)], capsys, message)
        assert (sorted(os.listdir(out)) if out.is_dir() else out.read_bytes()) == before


def test_the_hf_export_check_passes_with_newlines_in_the_prompts_and_its_tokenizer_has_no_unknown(tmp_path):
    """The newline is token 0 of a character vocabulary, which GPT-2's generate takes for padding when no
    attention mask is given; and a character outside the vocabulary is an error, not silently a newline."""
    pytest.importorskip("transformers")
    from distill.compress.hf_gpt import export_gpt2
    from distill.pipeline.artifacts import load_model_at
    path = recipe(tmp_path, teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    run(Recipe.load(path))
    data = load_data(Recipe.load(path).cfg["data"])
    assert data.class_names[0] == "\n"
    x = data.x_test[:8].clone()
    x[:, 2] = x[:, 5] = 0  # newlines inside the prompts that the check generates from
    model = load_model_at(str(tmp_path / "run" / "student.safetensors"), "student")
    info = export_gpt2(model, data.class_names, x, str(tmp_path / "hf"), {"role": "student"})
    assert info["greedy_tokens_equal"]
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok("All:\n")["input_ids"] == [data.class_names.index(c) for c in "All:\n"]
    with pytest.raises(Exception, match="UNK"):
        tok("All: #")


def test_the_gpt_exports_to_onnx_with_the_tokens_as_its_only_input(tmp_path):
    pytest.importorskip("onnxruntime")
    from distill.compress.export import export_model
    model = build_model({"model": "gpt", "args": {"layers": 1, "width": 16, "heads": 2}}, (12,), 9).eval()
    x = torch.randint(0, 9, (4, 12))
    info = export_model(model, x, "onnx", str(tmp_path / "g.onnx"), {})  # (checked in ONNX Runtime on x)
    import onnx
    import onnxruntime
    assert [i.name for i in onnx.load(str(tmp_path / "g.onnx")).graph.input] == ["x"]
    assert info["max_abs_diff"] <= info["tolerance"]
    session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 12), (2, 5), (3, 1)):  # (any batch and any length up to the context: a prompt, a decode)
        x = torch.randint(0, 9, shape)
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), model(x), atol=1e-5)


def test_kv_cache_generation_equals_recomputing_the_prefix():
    torch.manual_seed(0)
    model = build_model({"model": "gpt", "args": {"layers": 2, "width": 32, "heads": 4}}, (12,), 9).eval()
    prompt = torch.randint(0, 9, (3, 4))

    def recompute(ids, n):
        for _ in range(n):
            ids = torch.cat([ids, model(ids[:, -12:])[:, -1].argmax(-1, keepdim=True)], 1)
        return ids
    for n in (1, 8, 20):  # within the context (the cache), and past it (the window slides)
        assert torch.equal(model.generate(prompt, n, temperature=0), recompute(prompt, n))
    a = model.generate(prompt, 6, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, model.generate(prompt, 6, 1.0, torch.Generator().manual_seed(3)))


def test_sequence_kd_trains_the_student_on_teacher_written_windows(tmp_path):
    from safetensors.torch import load_file as load
    path = recipe(tmp_path, distill={"alpha": 0.0, "sequence_kd": {"windows": 40, "prompt": 6}},
                  teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    run(Recipe.load(path))
    ids = load(tmp_path / "run" / "teacher_samples.safetensors")["ids"]
    data = load_data(Recipe.load(path).cfg["data"])
    assert ids.shape == (40, 25) and ids.dtype == torch.long and int(ids.max()) < data.num_classes
    prefixes = {tuple(w[:6].tolist()) for w in data.x_train}
    assert all(tuple(w[:6].tolist()) in prefixes for w in ids)  # each continues a training window's start
    stages = json.load(open(tmp_path / "run" / "stages.json"))
    assert stages["teacher_samples"]["windows"] == 40 and stages["student"]["added"]["teacher_written"] == 40
    before = (tmp_path / "run" / "teacher_samples.safetensors").read_bytes()
    run(Recipe.load(path, ["student.train.epochs=2"]), overwrite=True)  # another budget: the same teacher text
    assert (tmp_path / "run" / "teacher_samples.safetensors").read_bytes() == before
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert sum("teacher_samples: 40 windows" in r.get("event", "") for r in log) == 1


def test_word_level_kd_on_teacher_written_windows_uses_the_teachers_logits_on_those_windows(tmp_path):
    """Seq-KD plus forward KL (alpha 0.5), for two student seeds sharing one cache: each seed's teacher writes
    other windows, so each needs its own soft labels. (They were once keyed by the settings alone, and the
    second seed trained on the first seed's soft labels, positions of another text: 3.24 bits/char against
    2.62 on tiny Shakespeare.)"""
    import numpy as np
    from safetensors.torch import load_file as load
    from distill.teachers.online import teacher_forward
    from distill.pipeline.artifacts import load_model_at
    cache = str(tmp_path / "cache")
    path = recipe(tmp_path, distill={"sequence_kd": {"windows": 32, "prompt": 6}}, output={"cache_dir": cache},
                  teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    keys = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        run(Recipe.load(path, [f"student.train.seed={seed}", f"output.dir={out}"]))
        windows = load(out / "teacher_samples.safetensors")["ids"][:, :-1]
        key = json.load(open(out / "soft_labels.json"))["cache_key"]
        logits = np.load(os.path.join(cache, key, "logits.npy"))
        teacher = load_model_at(str(out / "teacher.safetensors"), "teacher")
        assert torch.allclose(torch.from_numpy(logits), teacher_forward(teacher, windows)[0], atol=1e-5)
        keys.append(key)
    assert keys[0] != keys[1]


def test_top_k_cache_with_k_equal_to_the_vocabulary_trains_the_same_student_as_dense_logits(tmp_path):
    """k = V keeps every token (fp16 log-probabilities): the student stays within rounding of the dense run."""
    V = len(set(TEXT))
    over = dict(student={"train": {"epochs": 1}}, teacher={"train": {"epochs": 1}})
    dense = run(Recipe.load(recipe(tmp_path, **over)))
    top = run(Recipe.load(recipe(tmp_path, **over, distill={"topk": V}, output={"dir": str(tmp_path / "top")})))
    assert json.load(open(tmp_path / "top" / "soft_labels.json"))["topk"] == V
    assert top["student"]["loss"] == pytest.approx(dense["student"]["loss"], rel=2e-3)
    assert top["student_scratch"]["loss"] == dense["student_scratch"]["loss"]  # (the baseline reads no teacher)


def test_bench_measures_a_gpt_student_by_decoding(tmp_path):
    """`distill bench` on a character GPT: perplexity and bits per character as the run measured them, and
    decode speed per token at batch 1 and batched, for the fp32 and dynamic int8 students."""
    from distill.compress.bench import bench
    path = recipe(tmp_path, teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}}, baseline=False)
    metrics = run(Recipe.load(path))
    out = bench(Recipe.load(path, ["bench.variants=[fp32, dynamic, onnx]", "bench.models=[teacher]",
                                   "bench.latency_runs=3"]),  # (3 decodes per speed, not 5)
                str(tmp_path / "run"), echo=lambda m: None)
    rows = {(r["model"], r["variant"]): r for r in out["results"]}
    assert set(rows) == {("teacher", "fp32"), ("student", "fp32"), ("student", "dynamic")}, rows
    assert not [r for r in rows.values() if "error" in r], rows
    assert rows["student", "fp32"]["bpc"] == pytest.approx(metrics["student"]["bpc"], rel=1e-4)
    # the recommendation is chosen on validation next-token accuracy, as the run measured it
    assert rows["student", "fp32"]["val_accuracy"] == pytest.approx(metrics["student"]["val_accuracy"], rel=1e-4)
    assert out["recommended"]["chosen_on"] == "validation"
    assert os.path.isfile(rows["student", "dynamic"]["file"])  # (the int8 file: at this width no smaller than fp32)
    # the context is 24 tokens: a 1-token prompt and 23 new ones, every step with the KV cache
    assert all(r["p50_ms"] > 0 and r["throughput"] > 0 and (r["prompt_tokens"], r["decode_tokens"]) == (1, 23)
               for r in rows.values())


def test_a_stage_command_on_a_teacher_of_a_shorter_context_is_refused_before_anything_is_written(tmp_path, capsys):
    """train-student on rows longer than the saved teacher's table of learnt positions: preflight built a fresh
    teacher from the new recipe, so the mismatch was an IndexError traceback, after recipe.yaml was rewritten
    and the baseline trained again."""
    from distill.cli import main
    from test_bad_inputs import files
    path = recipe(tmp_path)
    out = str(tmp_path / "run")
    assert main(["train-teacher", path]) == 0
    capsys.readouterr()
    before = files(out)
    _refused(["train-student", out, "--set", "data.max_length=48", "--overwrite"], capsys,
             "teacher.safetensors: sequences of up to 48 tokens, and the teacher reads at most 24 positions")
    assert files(out) == before
