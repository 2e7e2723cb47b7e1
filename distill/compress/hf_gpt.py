"""The registry's `gpt` as a Hugging Face GPT-2 folder that plain `transformers` loads and generates from.

The architectures are the same (pre-norm blocks, learned positions, exact GELU, tied output layer), so the
weights map one to one; GPT-2's Conv1D layers hold the transposed matrices. The character vocabulary becomes
a `tokenizers` word-level model that splits text into single characters and joins them back without
spaces. Before the folder is kept, its logits are checked against the model's own on real inputs, and its
greedy continuation against `GPT.generate`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch

from ..errors import UserError
from ..io import atomic_folder, read_json, write_json
from ..models.gpt import GPT
from ..models.hf import transformers_module


def gpt2_config(model: GPT):
    GPT2Config = transformers_module().GPT2Config
    block = model.blocks[0]
    return GPT2Config(vocab_size=model.tok.num_embeddings, n_positions=model.context,
                      n_embd=model.tok.embedding_dim, n_layer=len(model.blocks), n_head=block.heads,
                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      layer_norm_epsilon=block.ln1.eps, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)


def gpt2_state(model: GPT) -> Dict[str, torch.Tensor]:
    sd = {"transformer.wte.weight": model.tok.weight, "transformer.wpe.weight": model.pos.weight,
          "transformer.ln_f.weight": model.ln.weight, "transformer.ln_f.bias": model.ln.bias,
          "lm_head.weight": model.head.weight}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": b.ln1.weight, p + "ln_1.bias": b.ln1.bias,
                   p + "ln_2.weight": b.ln2.weight, p + "ln_2.bias": b.ln2.bias,
                   p + "attn.c_attn.weight": b.qkv.weight.T, p + "attn.c_attn.bias": b.qkv.bias,
                   p + "attn.c_proj.weight": b.proj.weight.T, p + "attn.c_proj.bias": b.proj.bias,
                   p + "mlp.c_fc.weight": b.mlp[0].weight.T, p + "mlp.c_fc.bias": b.mlp[0].bias,
                   p + "mlp.c_proj.weight": b.mlp[2].weight.T, p + "mlp.c_proj.bias": b.mlp[2].bias})
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def char_tokenizer(vocab: List[str]):
    """A fast tokenizer over single characters (newlines and spaces included), decoding without spaces. It has
    no unknown token (the model has no row for one): a character outside the vocabulary is an error, not
    silently another character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    PreTrainedTokenizerFast = transformers_module().PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(vocab)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def check_out_folder(folder: str) -> None:
    """--out is replaced as a whole: only a missing or empty folder, or an earlier export, may be there."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out {folder}: a file; --format hf writes a folder, give a new folder's path")
    if os.path.isdir(folder) and os.listdir(folder) and not _an_export(folder):
        raise UserError(f"--out {folder}: a folder that holds other files and is not an earlier --format hf "
                        f"export, which it would replace; give a new folder's path")


def _an_export(folder: str) -> bool:
    """An earlier --format hf export: its distill.json says so (or, written before it did, a GPT-2 without
    the spec that a model folder of a run carries, which a copied-out student has)."""
    try:
        meta, config = (read_json(os.path.join(folder, f)) for f in ("distill.json", "config.json"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(config, dict) and (
        meta.get("export") == "hf" or ("spec" not in meta and config.get("model_type") == "gpt2"))


def export_gpt2(model: GPT, vocab: List[str], x: torch.Tensor, folder: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Write `folder` (atomically: a temp folder renamed) after checking logits and greedy tokens on `x`."""
    GPT2LMHeadModel = transformers_module().GPT2LMHeadModel  # (quiet: no progress bars of its own)
    check_out_folder(folder)
    model = model.eval()
    hf = GPT2LMHeadModel(gpt2_config(model))
    missing, unexpected = hf.load_state_dict(gpt2_state(model), strict=False)
    if unexpected or [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".masked_bias")]:
        raise UserError(f"export --format hf: the GPT-2 layout does not match ({missing[:3]} {unexpected[:3]})")
    hf.eval()
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    diff = float((ours - theirs).abs().max())
    if diff > 1e-4 * max(1.0, float(ours.abs().max())):
        raise UserError(f"{folder}: the Hugging Face GPT-2 differs from the model by {diff:.3g} on the logits; "
                        f"the folder was not written")
    prompt = x[:2, :max(1, model.context // 2)]  # (GPT-2 never looks past its n_positions: stay within them)
    new = model.context - prompt.shape[1]
    want = model.generate(prompt, new, temperature=0)
    with torch.no_grad():
        got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                          pad_token_id=0)  # (the mask given: else transformers hides every token equal to the pad id)
    if not torch.equal(got, want):
        raise UserError(f"{folder}: greedy generation of the Hugging Face GPT-2 differs from the model's")
    with atomic_folder(folder) as tmp:
        hf.save_pretrained(tmp)
        char_tokenizer(vocab).save_pretrained(tmp)
        write_json(os.path.join(tmp, "distill.json"), {**meta, "export": "hf"})
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"format": "hf", "path": folder, "size_bytes": size, "max_abs_diff": diff, "checked_on": int(len(x)),
            "greedy_tokens_equal": True, "preprocessing": "none"}
