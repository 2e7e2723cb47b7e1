"""Tiny causal-LM fixtures for fast tests: a character tokenizer built here (with a chat template, EOS and
pad), random Llama and GPT-2 configs of a few layers saved as local Hugging Face folders, and arithmetic
prompt/completion data from distill's own generator."""
from __future__ import annotations

import json
import os

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.utils.logging.disable_progress_bar()

CHARS = list("0123456789+-=:;,. \nabcdefghijklmnopqrstuvwxyzACS?")
SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def char_tokenizer(folder: str, extra: str = ""):
    """A character-level fast tokenizer: one token per character, BOS/EOS/pad and a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS + list(extra))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", additional_special_tokens=SPECIAL[3:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def tiny_llama(folder: str, layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               extra: str = "") -> str:
    import torch
    tok = char_tokenizer(folder, extra)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      intermediate_size=2 * hidden, max_position_embeddings=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def bpe_llama(folder: str, layers: int = 2, hidden: int = 32, seed: int = 0, tie: bool = True) -> str:
    """A tiny Llama with a byte-level BPE tokenizer trained here on arithmetic traces and some English (so
    that trimming to the arithmetic data has merges to drop), with BOS/EOS/pad and the chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from distill.data.arith import generate
    texts = [r["prompt"] + " " + r["completion"] for r in generate(200, seed, 1, 2)]
    texts += ["The quick brown fox jumps over the lazy dog while the zebra sleeps in the warm afternoon sun."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", additional_special_tokens=SPECIAL[3:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                                      max_position_embeddings=256, bos_token_id=fast.bos_token_id,
                                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                                      tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_gguf(folder: str, layers: int = 2, seed: int = 0, skip: tuple = ()) -> str:
    """A tiny Llama written as a GGUF file (fp32 tensors) with `bpe_llama`'s tokenizer in its metadata, as
    llama.cpp's converter lays them out: hyperparameters under `llama.*`, the BPE vocabulary and merges under
    `tokenizer.ggml.*`, the chat template, and the weights under their GGUF names (less those named in `skip`,
    e.g. "ffn_down")."""
    import json
    import numpy as np
    import gguf
    hf = bpe_llama(os.path.join(folder, "hf"), layers=layers, seed=seed)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    cfg = transformers.AutoConfig.from_pretrained(hf)
    merges = json.load(open(os.path.join(hf, "tokenizer.json")))["model"]["merges"]
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    path = os.path.join(folder, "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    h, n, v, ff, kv = (cfg.hidden_size, cfg.num_hidden_layers, len(tok), cfg.intermediate_size,
                       cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads)
    w.add_block_count(n), w.add_context_length(256), w.add_embedding_length(h), w.add_feed_forward_length(ff)
    w.add_head_count(cfg.num_attention_heads), w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0), w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    w.add_bos_token_id(tok.bos_token_id), w.add_eos_token_id(tok.eos_token_id), w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    rng = np.random.default_rng(seed)
    weight = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", weight(v, h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(n):
        for name, shape in (("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, h)),
                            ("ffn_gate", (ff, h)), ("ffn_up", (ff, h)), ("ffn_down", (h, ff))):
            if name not in skip:
                w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(h, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


def tiny_gpt2(folder: str, layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 0,
              positions: int = 256) -> str:
    import torch
    tok = char_tokenizer(folder)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=heads,
                                     n_positions=positions,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def arith_files(folder: str, n_train: int = 48, n_test: int = 16, seed: int = 0) -> tuple:
    from distill.data.arith import write_split
    os.makedirs(folder, exist_ok=True)
    return write_split(folder, n_train, n_test, seed=seed, operations=1, digits=2)


def write_jsonl(path: str, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def lm_recipe(tmp: str, **over) -> dict:
    """A recipe dict for a fast end-to-end run: tiny Llama teacher, a two-layer student kept from it."""
    llama = os.path.join(tmp, "llama")
    if not os.path.isdir(llama):
        tiny_llama(llama)
    train, test = arith_files(os.path.join(tmp, "arith"))
    recipe = {
        "name": "tiny_lm",
        "data": {"dataset": "completions", "path": train, "test_path": test, "max_length": 160, "batch_size": 8,
                 "eval_batch_size": 16},
        "teacher": {"hf": llama, "train": {"epochs": 1, "optimizer": {"lr": 3e-3}}},
        "student": {"from_teacher": {"layers": [0, 3]}, "train": {"epochs": 1, "optimizer": {"lr": 3e-3}}},
        "distill": {"method": "forward_kl", "temperature": 1.0, "alpha": 0.5},
        "evaluate": {"latency_runs": 2, "throughput_batch": 4, "exact_match": {"rows": 4, "max_new_tokens": 8}},
        "monitor": {"enabled": False},
        "output": {"dir": os.path.join(tmp, "run")},
    }
    for k, v in over.items():
        recipe[k] = {**recipe.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe
