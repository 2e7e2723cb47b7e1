"""The engine and the plan: one plan for every command (a search trains the assistants), registries that a
recipe reads, teacher outputs as a type with an aggregator, masks in every loss, the runtime, the baseline and
the validation split optional, the monitor off in one key, and weights files that depend on the weights only."""
import ast
import json
import os
import pathlib

import pytest
import torch

from distill import Recipe, run
from distill.cli import main
from distill.engine.batch import TeacherOutputs
from distill.engine.objective import Objective
from distill.engine.runtime import Runtime, resolve_device
from distill.errors import UserError
from distill.evaluate import format_table
from distill.losses import attention_kl, attention_mse, ce_loss, feature_cosine, feature_mse, kd_loss
from distill.pipeline.plan import plan
from distill.registry import AGGREGATORS, LOSSES, TASKS
from distill.tasks import task_for

TINY = ["train.epochs=2", "teacher.train.epochs=2", "data.train_subset=400", "monitor.gradients=false",
        "teacher.args={channels: [16, 32], hidden: 64}"]
ASSISTANT = "distill.assistants=[{model: cnn, args: {channels: [8], hidden: 64}}]"
quiet = lambda m: None  # noqa: E731


def test_plan_orders_every_stage_and_chains_add_their_links():
    cfg = Recipe.load("digits", [ASSISTANT, "compress.steps=[channels]"]).cfg
    steps = plan(cfg)
    assert [s.name for s in steps] == ["teacher", "assistant_1", "soft_labels", "student_scratch", "student",
                                       "evaluate", "compress/channels"]
    assert {s.name: s.teacher for s in steps}["student"] == "assistant_1"  # the student learns from the last link
    assert "student_scratch" not in [s.name for s in plan(Recipe.load("digits", ["baseline=false"]).cfg)]


def test_search_over_a_recipe_with_assistants_trains_the_assistants(tmp_path, capsys):
    out = str(tmp_path / "s")
    sets = [x for s in TINY for x in ("--set", s)]
    assert main(["search", "digits", *sets, "--set", ASSISTANT, "--grid", "distill.temperature=2,4",
                 "--out", out]) == 0
    stages = json.load(open(os.path.join(out, "trials", "stages.json")))
    assert "assistant_1" in stages  # the student of each trial learned from the assistant, not the teacher
    log = [json.loads(x) for x in open(os.path.join(out, "trials", "log.jsonl"))]
    assert any(r.get("model") == "assistant_1" and "val_accuracy" in r for r in log)


def test_no_import_circle_inside_the_package():
    root = pathlib.Path(__file__).resolve().parent.parent / "distill"
    mods = {".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): f
            for f in root.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:
                    target = next((c for c in (f"{base}.{a.name}", base) if c in mods and c != m), None)
                    if target and not mods[target].name == "__init__.py":
                        graph[m].add(target)
    seen, stack = {}, []

    def visit(u):
        seen[u] = 1
        stack.append(u)
        for v in graph[u]:
            assert seen.get(v) != 1, " -> ".join(stack[stack.index(v):] + [v])
            if not seen.get(v):
                visit(v)
        stack.pop()
        seen[u] = 2
    for m in graph:
        if not seen.get(m):
            visit(m)


def test_recipe_reads_feature_losses_from_the_registry():
    assert set(LOSSES.names(group="feature")) == {"mse", "cosine", "attention_kl", "attention_mse", "at", "pkt", "rkd",
                                                  "rkd_distance", "rkd_angle", "sp", "crd"}
    with pytest.raises(UserError, match=r"distill.features\[0\].loss: not a feature loss of the registry"):
        Recipe.load("digits", ["distill.features=[{teacher: head, student: head, loss: kd}]"])
    assert "classification" in TASKS.names() and {"single", "mean"} <= set(AGGREGATORS.names())
    assert task_for().select_metric == "val_accuracy"


def test_every_loss_takes_a_mask_and_all_true_equals_no_mask():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    ones, some = torch.ones(3, 5, dtype=torch.bool), torch.rand(3, 5) > 0.4
    assert torch.allclose(kd_loss(s, t, 2.0, mask=ones),
                          kd_loss(s.reshape(15, 7), t.reshape(15, 7), 2.0))
    for name in LOSSES.names(group="logits"):
        loss, labels = LOSSES.get(name), torch.randint(0, 7, (3, 5))  # (each position a sample, with no mask too:
        kw = {"labels": labels} if name == "dkd" else {}  # kd was once the sum over positions, 5x)
        flat = loss(s.reshape(15, 7), t.reshape(15, 7), 2.0, **({"labels": labels.reshape(15)} if kw else {}))
        assert torch.allclose(loss(s, t, 2.0, **kw), flat) and torch.allclose(loss(s, t, 2.0, mask=ones, **kw), flat)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), reduction="none",
                                    log_target=True).sum(-1)
    assert torch.allclose(kd_loss(s, t, 2.0, mask=some), kl[some].mean() * 4)  # masked positions left out
    assert torch.allclose(feature_mse(s, t, mask=ones), feature_mse(s, t))
    assert torch.allclose(feature_mse(s, t, mask=some), ((s - t) ** 2).mean(-1)[some].mean())
    assert torch.allclose(feature_cosine(s, t, mask=ones), feature_cosine(s, t))
    y = torch.tensor([0, 1, 2])
    logits = torch.randn(3, 4)
    assert torch.allclose(ce_loss(logits, y, mask=torch.tensor([True, False, True])),
                          torch.nn.functional.cross_entropy(logits[[0, 2]], y[[0, 2]]))
    a_s, a_t = torch.rand(2, 2, 4, 4).softmax(-1), torch.rand(2, 2, 4, 4).softmax(-1)
    full = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(attention_kl(a_s, a_t, mask=full), attention_kl(a_s, a_t))
    assert torch.allclose(attention_mse(a_s, a_t, mask=full), attention_mse(a_s, a_t))
    # a text's loss per query is the same beside a longer one: its padded keys (0 on both sides) and queries
    # count nothing (the batch's loss: the mean over its real queries, 3 of one text and 5 of the other)
    short = [torch.rand(1, 2, 3, 3).softmax(-1) for _ in range(2)]
    padded = [torch.cat([torch.nn.functional.pad(m, (0, 2, 0, 2)), torch.rand(1, 2, 5, 5).softmax(-1)])
              for m in short]
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    for loss in (attention_mse, attention_kl):
        alone, beside = loss(*short), loss(*padded, mask=mask)
        assert torch.allclose(beside, (3 * alone + 5 * loss(padded[0][1:], padded[1][1:])) / 8), loss.__name__


def test_objective_takes_a_dict_of_teachers_and_an_aggregator():
    torch.manual_seed(0)
    student, t1, t2 = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y, idx = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    src = lambda t: (lambda xx, i: TeacherOutputs(t(xx).detach()))  # noqa: E731
    dcfg = {"alpha": 1.0, "temperature": 2.0, "features": []}
    loss, _ = Objective(student, dcfg, {"a": src(t1), "b": src(t2)}, aggregator="mean")(x, y, idx)
    with torch.no_grad():
        want = kd_loss(student(x), (t1(x) + t2(x)) / 2, 2.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(UserError, match="single takes one teacher"):
        Objective(student, dcfg, {"a": src(t1), "b": src(t2)})(x, y, idx)
    with pytest.raises(ValueError):
        TeacherOutputs()  # neither dense logits nor the top-k form


@pytest.mark.parametrize("method", ["kd", "dkd", "dist", "forward_kl"])
def test_every_logit_method_refuses_other_widths_and_scores_no_position_as_zero(method):
    """kd, dkd and dist met a teacher of another width with a bare RuntimeError (the token methods alone named
    it), and a micro-batch with no position to score (a causal LM's, flattened) with 0/0 = NaN, a skipped step."""
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)
    x, y, idx = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    dcfg = {"alpha": 0.5, "temperature": 2.0, "features": [], "method": method}
    objective = Objective(student, dcfg, {"a": lambda xx, i: TeacherOutputs(teacher(xx).detach())})
    with pytest.raises(UserError, match=f"distill.method: {method}: the student gives 3 logits per token and the "
                                        f"teacher 5"):
        objective(x, y, idx)
    none = torch.zeros(0, 3, requires_grad=True)
    term = objective.logit_term(none, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), None, None)
    assert term.item() == 0.0 and term.requires_grad


def test_the_table_keeps_a_column_some_models_have():
    """The teacher has no KL to itself nor agreement: the students' columns were dropped from a language
    model's table (KL was in no table at all)."""
    table = format_table({"teacher": {"perplexity": 1.06, "params": 100},
                          "student": {"perplexity": 1.1, "params": 50, "teacher_kl": 0.13, "top1_agreement": 0.95}})
    head, _, teacher, student = table.splitlines()
    assert head.split("  ")[0] == "model" and "KL to teacher" in head and "agree" in head
    assert teacher.split()[-3:] == ["–", "–", "100"] and student.split()[-3:] == ["0.130", "0.950", "50"]


def test_runtime_picks_the_device_and_refuses_a_missing_one():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="train.device: cuda: no CUDA device"):
            resolve_device("cuda")
    rt = Runtime()
    assert rt.is_main and rt.world_size == 1 and rt.autocast_device == "cpu"
    x = torch.ones(2)
    assert rt.put(x) is x  # on the CPU the same tensors come back


def test_no_baseline_skips_the_scratch_student_and_says_so(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["run", "digits", "--out", out, "--no-baseline", *[x for s in TINY for x in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "student_scratch.safetensors"))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["student_scratch"] == {"skipped": True} and "accuracy" in metrics["student"]
    assert "student (no KD): skipped (baseline: false)" in printed
    assert "student (no KD)" not in format_table(metrics).splitlines()[0]
    assert main(["doctor", out]) == 0  # the rules that compare against the baseline say why they are skipped
    report = json.load(open(os.path.join(out, "doctor.json")))
    assert any("baseline: false" in why for why in report["skipped"].values())


def test_all_training_data_with_no_validation_split(tmp_path):
    with pytest.raises(UserError, match="train.select: best_val picks the epoch .* data.val_fraction is 0"):
        Recipe.load("digits", ["data.val_fraction=0"])
    out = str(tmp_path / "r")
    m = run(Recipe.load("digits", [*TINY, "data.val_fraction=0", "train.select=last"]), out, echo=quiet)
    stages = json.load(open(os.path.join(out, "stages.json")))
    assert stages["student"]["selected_epoch"] == 2 and "val_accuracy" not in stages["student"]
    assert 0 < m["student"]["accuracy"] <= 1


def test_monitor_off_switches_every_signal_off(tmp_path):
    out = str(tmp_path / "r")
    run(Recipe.load("digits", [*TINY, "monitor=off"]), out, echo=quiet)
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert not any("step" in r for r in lines)  # no step lines
    epochs = [r for r in lines if r.get("model") == "student" and "val_accuracy" in r]
    assert epochs and not any(k.startswith(("retention", "grad_")) for r in epochs for k in r)
    assert "monitor_s" not in json.load(open(os.path.join(out, "stages.json")))["student"]  # (nothing timed)
    assert Recipe.load("digits", ["monitor=off"]).cfg["monitor"]["enabled"] is False


def test_a_weights_file_depends_only_on_the_weights(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        run(Recipe.load("digits", [*TINY, "monitor=off"]), out, echo=quiet)
    for name in ("teacher.safetensors", "student.safetensors", "student_scratch.safetensors"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name
    from distill.io import load_meta
    meta = load_meta(os.path.join(a, "student.safetensors"))
    assert "train_time_s" not in meta and "train_time_s" in json.load(open(os.path.join(a, "metrics.json")))["student"]
    assert meta["preprocessing"]["normalize"]["mean"] and meta["class_names"] == [str(i) for i in range(10)]


def test_runtime_moves_batches_and_teacher_outputs_whole():
    from distill.engine.batch import Batch
    rt = Runtime(torch.device("meta"))  # a device other than the CPU, without a GPU
    b = rt.put(Batch(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2)))
    assert b.x.device.type == b.y.device.type == "meta" and b.idx.device.type == "meta"
    t = rt.put(TeacherOutputs(torch.ones(2, 3), {"f": torch.ones(2, 4)}))
    assert t.logits.device.type == "meta" and t.features["f"].device.type == "meta" and t.mask is None


def test_commands_that_rank_or_measure_on_validation_refuse_no_validation_split(tmp_path, capsys):
    no_val = ["--set", "data.val_fraction=0", "--set", "train.select=last"]
    assert main(["search", "digits", *no_val, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.val_fraction: 0 leaves no validation split" in err
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(UserError, match="student.train.device: one per run; set train.device"):
        Recipe.load("digits", ["student.train.device=cpu", "train.device=auto"])


def test_a_top_level_train_override_that_reaches_no_model_is_refused(tmp_path, capsys):
    """A run folder's recipe.yaml is resolved: each model sets every train key, so `--set train.epochs=...`
    would silently reach neither. It is one line and exit 2, naming the keys that do reach them; nothing is
    written. An override the models take (or already hold) passes; the one-per-run keys (device, timeout_s)
    are set for every model, and do not make the folder 'a run of a different recipe'."""
    from distill.pipeline.rundir import RunDir
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(Recipe.load("breast_cancer").to_yaml())
    before = sorted(os.listdir(folder))
    assert main(["train-student", str(folder), "--set", "train.epochs=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--set train.epochs: every model in" in err and "set teacher.train.epochs " \
        "and/or student.train.epochs instead" in err
    assert sorted(os.listdir(folder)) == before  # nothing written
    with pytest.raises(UserError, match="reaches none; set teacher.train.scheduler.interval"):
        Recipe.load_run_folder(str(folder), ["train.scheduler.interval=step"])
    both = Recipe.load_run_folder(str(folder), ["train.epochs=7", "teacher.train.epochs=7", "student.train.epochs=7"])
    assert both.cfg["teacher"]["train"]["epochs"] == both.cfg["student"]["train"]["epochs"] == 7
    recipe = Recipe.load_run_folder(str(folder), ["student.train.epochs=7", "train.device=cpu", "train.timeout_s=60",
                                                  f"train.seed={Recipe.load('breast_cancer').cfg['train']['seed']}"])
    cfg = recipe.cfg
    assert cfg["student"]["train"]["epochs"] == 7 and cfg["teacher"]["train"]["epochs"] != 7
    assert cfg["train"]["timeout_s"] == 60 and all(cfg[r]["train"]["timeout_s"] == 60 for r in ("teacher", "student"))
    # (where and how long it runs is not what the run is: the folder is not refused as another run's)
    RunDir(Recipe.load_run_folder(str(folder), ["train.device=cpu", "train.timeout_s=60"]), str(folder))
    # in a recipe that leaves a model's own key unset, train.* reaches it, as always
    from distill.recipe import read_yaml, resolve_recipe_path
    raw = read_yaml(resolve_recipe_path("breast_cancer"))
    raw["teacher"]["train"] = {"epochs": 4}
    cfg = Recipe.from_dict(raw, ["train.epochs=5"]).cfg
    assert cfg["student"]["train"]["epochs"] == 5 and cfg["teacher"]["train"]["epochs"] == 4


def test_warmup_steps_ramp_the_learning_rate_linearly_then_hand_back_to_the_schedule(tmp_path):
    from distill.data import load_data
    from distill.engine.callbacks import Callback
    from distill.engine.trainer import Trainer
    from distill.models import mlp
    recipe = Recipe.load("breast_cancer", ["train.epochs=2", "train.scheduler.warmup_steps=5",
                                           "train.scheduler.name=constant", "data.batch_size=64"])
    seen = []

    class Rates(Callback):
        def on_step_end(self, t, epoch, record, skipped):
            seen.append(t.opt.param_groups[0]["lr"])
    data = load_data(recipe.cfg["data"])
    Trainer("student", Objective(mlp(data.input_shape, 2, hidden=[4])), data, recipe.cfg["data"],
            recipe.cfg["student"]["train"], [Rates()]).fit()
    lr = recipe.cfg["student"]["train"]["optimizer"]["lr"]
    assert seen[:5] == pytest.approx([lr * k / 5 for k in range(1, 6)]) and all(v == lr for v in seen[5:])
    assert len(seen) > 6


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # (the test's wrapper)
def test_a_step_interval_decays_the_lr_every_step_and_keeps_old_fingerprints(tmp_path):
    """`scheduler.interval: step`: the cosine factor at steps/steps-per-epoch, set before each step (times the
    warm-up ramp over the first steps), down to nearly 0 at the last step; the default, once an epoch, leaves
    the stage's inputs as they were before the key existed."""
    from distill.data import load_data
    from distill.engine.callbacks import Callback
    from distill.engine.trainer import Trainer, lr_factor
    from distill.models import mlp
    from distill.pipeline.training import _train_inputs
    recipe = Recipe.load("breast_cancer", ["train.epochs=3", "train.scheduler.interval=step",
                                           "train.scheduler.warmup_steps=3", "data.batch_size=64"])
    seen = []

    class Rates(Callback):  # the lr each optimizer step uses
        def on_fit_start(self, t):
            step = t.opt.step
            t.opt.step = lambda: (seen.append(t.opt.param_groups[0]["lr"]), step())
    data = load_data(recipe.cfg["data"])
    tcfg = recipe.cfg["student"]["train"]
    trainer = Trainer("student", Objective(mlp(data.input_shape, 2, hidden=[4])), data, recipe.cfg["data"], tcfg,
                      [Rates()])
    trainer.fit()
    per, lr = trainer.per_epoch, tcfg["optimizer"]["lr"]
    want = [lr * lr_factor(s / per, tcfg["scheduler"], 3) * min(1.0, (s + 1) / 3) for s in range(3 * per)]
    assert per > 2 and seen == pytest.approx(want, rel=1e-12)
    assert all(a > b for a, b in zip(seen[3:], seen[4:])) and seen[-1] < 0.01 * lr  # every step lower, to ~0
    assert trainer.opt.param_groups[0]["lr"] < 0.01 * lr  # (and no epoch-end step of the schedule on top)
    saved = trainer.state()  # resumed with the other interval: refused (its count is in the other unit)
    again = Trainer("student", Objective(mlp(data.input_shape, 2, hidden=[4])), data, recipe.cfg["data"],
                    {**tcfg, "scheduler": {**tcfg["scheduler"], "interval": "epoch"}}, [])
    again._setup()
    with pytest.raises(UserError, match="train.scheduler.interval: student's checkpoint moved the lr every step"):
        again.load_state(saved)
    default = Recipe.load("breast_cancer").cfg["student"]["train"]
    assert default["scheduler"]["interval"] == "epoch" and "interval" not in _train_inputs(default)["scheduler"]
    assert _train_inputs(tcfg)["scheduler"]["interval"] == "step"


def test_the_teachers_max_pooling_runs_channels_last_with_the_same_bits():
    """teacher_forward (the online teacher, the soft-label cache) pools channels-last: every output bit, and a
    captured pooling output, as the plain forward pass gives them; the model is left without hooks."""
    from distill.engine.inference import fast_pooling
    from distill.hooks import FeatureCapture
    from distill.models import build_model
    from distill.teachers import teacher_forward
    torch.manual_seed(0)
    teacher = build_model({"model": "cnn", "args": {"channels": [8, 16], "hidden": 32}}, (1, 12, 12), 5).eval()
    x = torch.randn(16, 1, 12, 12)
    x[0, 0, 0, 0], x[1] = float("nan"), 0.0  # (a NaN propagates; an all-zero image)
    with torch.no_grad(), FeatureCapture(teacher, ["body.2"]) as cap:
        ref, ref_pool = teacher(x), cap.outputs["body.2"]
    with FeatureCapture(teacher, ["body.2"]) as cap:
        logits, feats = teacher_forward(teacher, x, cap)
    assert torch.equal(logits.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(feats["body.2"].view(torch.int32), ref_pool.view(torch.int32))
    assert feats["body.2"].is_contiguous()
    pool = teacher.body[2]
    seen = []
    with fast_pooling(teacher):  # (a hook added inside the block runs after the relayout)
        hook = pool.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        with torch.no_grad():
            teacher(x)  # channels-last into the pool
        teacher(x).sum()  # gradients on: as it was (the channels-last backward is slower)
    with torch.no_grad():
        teacher(x)  # after the block: as it was
    hook.remove()
    assert seen == [False, True, True]
    assert not pool._forward_hooks and not pool._forward_pre_hooks and "_distill_relayout" not in pool.__dict__
    y = torch.randn(2, 3, 4, 4)
    with fast_pooling(teacher), torch.no_grad():
        inside = pool(input=y)  # (a keyword call: no positional input for the hook, left as it is)
    assert torch.equal(inside, pool(y))


def test_the_gradient_check_flags_nan_or_inf_in_any_group_and_leaves_every_bit():
    from distill.engine.trainer import flag_non_finite
    grads = [torch.tensor([1e-40, -0.0, 3.0]), torch.randn(4, 3)]  # (1e-40: a denormal)
    before = [g.clone() for g in grads]
    found = torch.zeros(1)
    assert not bool(flag_non_finite(grads, found))
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(grads, before))
    grads[1][2, 1] = float("inf")
    assert bool(flag_non_finite(grads, torch.zeros(1)))
    halves = [torch.ones(3, dtype=torch.bfloat16), torch.tensor([float("nan")], dtype=torch.bfloat16)]
    assert bool(flag_non_finite(halves, torch.zeros(1))) and not bool(flag_non_finite(halves[:1], torch.zeros(1)))


def test_a_steps_loss_parts_are_summed_by_name_whatever_their_order():
    """An on-policy step gives its parts (ce, kd, total, counts) in another order than a step on gold tokens:
    the epoch's sums were reset at every switch, and its logged losses came from the last steps only."""
    from types import SimpleNamespace
    from distill.engine.trainer import Trainer
    t = SimpleNamespace(prog={"sums": {}, "window": {}})
    gold = {"ce": torch.tensor(1.0), "correct": torch.tensor(3), "labelled": torch.tensor(4), "kd": torch.tensor(0.5),
            "total": torch.tensor(0.75)}
    on_policy = {"ce": torch.tensor(0.0), "kd": torch.tensor(0.25), "total": torch.tensor(0.25),
                 "correct": torch.tensor(0), "labelled": torch.tensor(0)}
    for parts in (gold, on_policy, gold):
        Trainer._accumulate(t, parts, parts["total"])
    sums = dict(zip(t.prog["sums"]["keys"], t.prog["sums"]["values"].tolist()))
    assert sums == {"ce": 2.0, "correct": 6.0, "kd": 1.25, "labelled": 8.0, "total": 1.75}
    assert t.prog["window"]["n"] == 3


def test_macro_f1_leaves_out_a_class_neither_in_the_test_split_nor_predicted():
    """Over the classes present: a class the test split lacks (and no model predicts) counted as F1 0,
    understating every model (perfect predictions scored 0.667)."""
    from sklearn.metrics import f1_score
    from distill.tasks.classification import classification_metrics
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    logits = torch.zeros(6, 3)
    logits[torch.arange(6), y] = 5
    assert classification_metrics(logits, y)["macro_f1"] == 1.0
    logits[0] = torch.tensor([0.0, 0.0, 5.0])  # (a class predicted but absent counts, as in sklearn)
    assert classification_metrics(logits, y)["macro_f1"] == f1_score(y, logits.argmax(1), average="macro")


def test_binary_metrics_a_one_class_test_split_leaves_undefined_are_null_in_valid_json(tmp_path):
    """AUC, sensitivity or specificity of a test split without the positive (or negative) class were written
    as a bare NaN, which is not JSON (a JavaScript reader refuses the file); one seed's NaN made the mean
    over --seeds NaN too."""
    import json
    from distill.io import write_json
    from distill.tasks.classification import classification_metrics
    m = classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), 1)
    assert m["auc"] is None and m["sensitivity"] is None and m["specificity"] == 0.5
    write_json(str(tmp_path / "m.json"), m)
    assert json.loads(open(tmp_path / "m.json").read(), parse_constant=lambda c: 1 / 0) == m  # (no NaN token)


def test_latency_reads_a_median_length_text_without_its_padding():
    """A causal LM reads every column it is given: latency and throughput ran over the longest test text's
    width, padding included."""
    from types import SimpleNamespace
    from distill.evaluate import typical_sample
    x = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 4]])
    assert typical_sample(x, SimpleNamespace(pad_id=0)).tolist() == [[5, 6, 7]]
    assert typical_sample(x, SimpleNamespace(pad_id=None)).tolist() == [x[0].tolist()]  # (fixed-width inputs)
    # the pad id inside a text (SmolLM2 pads with the EOS that ends each chat turn): real tokens, not cut off
    x = torch.tensor([[5, 2, 7, 2, 8, 2, 2], [5, 2, 2, 2, 2, 2, 2], [5, 6, 7, 8, 9, 4, 3]])
    assert typical_sample(x, SimpleNamespace(pad_id=2)).tolist() == [[5, 2, 7, 2, 8]]


def test_accumulating_micro_batches_trains_as_the_whole_batch_when_some_samples_lack_a_label(tmp_path):
    """Cross-entropy is a mean over the labelled samples. Each micro-batch took its own (1 label of 4 weighed as
    much as 3 of 4): with label_fraction < 1, train.accumulate and --nproc changed the result. Now a micro-batch's
    mean weighs its share of the step's labels (Hugging Face's num_items_in_batch)."""
    from safetensors.torch import load_file
    sets = ["teacher.args.dropout=0.0", "train.epochs=3", "train.select=last", "data.label_fraction=0.3",
            "monitor=off", f"output.cache_dir={tmp_path / 'cache'}"]
    for name, extra in (("one", []), ("two", ["student.train.accumulate=2"])):
        run(Recipe.load("breast_cancer", sets + extra), str(tmp_path / name), echo=quiet)
    one, two = (load_file(str(tmp_path / n / "student.safetensors")) for n in ("one", "two"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_language_model_s_token_means_weigh_each_micro_batch_by_its_target_tokens():
    """ce, the token KD term and a feature loss over the target tokens are means over a micro-batch's targets;
    completions of unequal length give micro-batches unequal counts. With target_share set as the trainer sets
    it, two micro-batches give the whole batch's gradient."""
    from distill.models.gpt import GPT
    torch.manual_seed(0)
    student = GPT(vocabulary=11, context=8, layers=1, width=16, heads=2, dropout=0.0)
    x, y = torch.randint(0, 11, (4, 8)), torch.randint(0, 11, (4, 8))
    y[0, :7] = -100  # 1 target token in the first half, 13 in the second
    y[1, :] = -100
    y[2, :3] = -100
    t_logits, t_feat = torch.randn(4, 8, 11), torch.randn(4, 8, 16)
    hidden = [{"teacher": "blocks.0", "student": "blocks.0", "loss": "mse", "weight": 1.0, "projector": "identity"}]
    obj = Objective(student, {"alpha": 0.5, "temperature": 2.0, "method": "forward_kl", "features": hidden},
                    lambda xx, idx: TeacherOutputs(t_logits[idx], {"blocks.0": t_feat[idx]}),
                    {"blocks.0": (8, 16)}, {"blocks.0": (8, 16)})

    def grad(pieces):
        student.zero_grad()
        for idx in pieces:
            share = len(idx) / 4
            obj.target_share = int((y[idx] >= 0).sum()) / int((y >= 0).sum()) / share
            loss, _ = obj(x[idx], y[idx], idx, y[idx] >= 0)
            (loss * share).backward()
        obj.target_share = 1.0
        return [p.grad.clone() for p in student.parameters()]

    for whole, halves in zip(grad([torch.arange(4)]), grad([torch.arange(2), torch.arange(2, 4)])):
        torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-7)
