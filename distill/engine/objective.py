"""The objective: a batch in, the loss and its parts out.

    loss = (1 - alpha) * ce(student, labels) + alpha * kd(student, teacher; T) + sum_i w_i * feature_i

Every term is looked up in the loss registry by name (`ce`, `kd`, the `distill.features[i].loss` names),
and each takes an optional mask. The teachers are a dict of named teacher sources; an aggregator (from its
registry) makes one `TeacherOutputs` of theirs: `single` (the default, for one teacher) passes it through.
Without a teacher the objective is plain cross-entropy (the scratch baseline). Projectors live here, not in
the student, so they train with it and are left out of the exported student.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..data.augment_text import mask_tokens
from ..errors import UserError
from ..hooks import FeatureCapture
from ..losses import Projector, align, confidence_weights
from ..losses.logits import standardize
from ..losses.tokens import require_same_shape
from ..registry import AGGREGATORS, LOSSES
from .batch import TeacherOutputs, TeacherSource
from .runtime import CPU, Runtime

PLAIN = {"alpha": 0.0, "temperature": 1.0, "features": []}


@AGGREGATORS.register("single")
def single(outputs: Dict[str, TeacherOutputs]) -> TeacherOutputs:
    """The one teacher's outputs, as they are."""
    if len(outputs) != 1:
        raise UserError(f"distill.aggregate: single takes one teacher, got {len(outputs)} ({', '.join(outputs)}); "
                        f"choose mean")
    return next(iter(outputs.values()))


@AGGREGATORS.register("mean")
def mean(outputs: Dict[str, TeacherOutputs]) -> TeacherOutputs:
    """The teachers' logits and features averaged (one class list and layer shapes for all)."""
    outs = list(outputs.values())
    if not all(o.dense for o in outs):
        raise UserError("distill.aggregate: mean needs dense teacher logits from every teacher")
    return TeacherOutputs(torch.stack([o.logits for o in outs]).mean(0),
                          {k: torch.stack([o.features[k] for o in outs]).mean(0) for k in outs[0].features},
                          outs[0].mask)


def at_positions(out: TeacherOutputs, keep: torch.Tensor) -> TeacherOutputs:
    """The teacher's logits (dense or top-k) at the positions `keep` (bool, N x L), flattened as the
    student's are; features stay whole (their losses take the mask)."""
    pick = lambda t: None if t is None else t[keep.to(t.device)]  # noqa: E731
    return TeacherOutputs(pick(out.logits), out.features, None, pick(out.topk_ids), pick(out.topk_logprobs),
                          pick(out.tail_mass))


def _loss(name: str) -> Callable:
    return LOSSES.get(name, "distill.features.loss")


def _masked(mask: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The mask keyword only when there is one: without it every loss keeps its plain (unmasked) form."""
    return {} if mask is None else {"mask": mask}


class Objective(nn.Module):
    def __init__(self, student: nn.Module, dcfg: Optional[Dict[str, Any]] = None,
                 teachers: Union[TeacherSource, Dict[str, TeacherSource], None] = None,
                 teacher_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                 student_shapes: Optional[Dict[str, Tuple[int, ...]]] = None, *,
                 aggregator: str = "single", runtime: Runtime = CPU, task: Any = None, n_train: int = 0) -> None:
        super().__init__()
        from ..tasks.classification import Classification
        self.student, self.runtime = student, runtime
        self.task = task or Classification()  # (the trainer's task counts the same way)
        self.teachers: Dict[str, TeacherSource] = (teachers if isinstance(teachers, dict)
                                                   else {"teacher": teachers} if teachers else {})
        self.aggregate = AGGREGATORS.get(aggregator, "distill.aggregate")
        self.dcfg = dcfg or PLAIN
        self.features: List[Dict[str, Any]] = self.dcfg["features"] if self.teachers else []
        # the logit term: `distill.method` (kd, dkd, dist, ...) with its settings section, if it has one
        self.method = self.dcfg.get("method", "kd")
        self.logit_loss = _loss(self.method)
        method_tags = LOSSES.tags(self.method)
        self.method_args = dict(self.dcfg.get(method_tags.get("settings", ""), {}))
        self.warmup_epochs = self.method_args.pop("warmup_epochs", 0)
        self.method_labels = bool(method_tags.get("labels"))
        self.n_train = n_train
        self.projectors = nn.ModuleList(self._projector(i, f, student_shapes, teacher_shapes)
                                        for i, f in enumerate(self.features))
        self._capture = FeatureCapture(student, [f["student"] for f in self.features], "distill.features")
        noise = self.dcfg.get("data", {})
        self.mask_fraction = noise["mask_fraction"] if self.teachers and noise.get("mask") else 0.0
        if self.mask_fraction and getattr(student, "mask_id", None) is None:
            raise UserError("distill.data.mask: the student's tokenizer has no mask token to mask inputs with")
        self.teacher_sees_noise = noise.get("teacher_sees") == "noised"
        # Distillation strength: the monitor's reaction may change it (saved in checkpoints as extra state);
        # the schedules move alpha and T from it as training progresses (`progress`, set by the trainer).
        self.strength = {"alpha": float(self.dcfg["alpha"]), "temperature": float(self.dcfg["temperature"]),
                         "feature_scale": 1.0}
        self.progress = 0.0
        self.epoch = 0.0  # epochs done (fractional), set by the trainer: warm-ups count in epochs
        self.terms: Dict[str, torch.Tensor] = {}  # the last batch's KD and CE terms, for gradient consistency
        self.target_share = 1.0  # set by the trainer per micro-batch: see per_target
        self.step_seeds: Optional[Tuple[int, int]] = None  # set by the trainer: see on_policy_now
        self.samples: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the trainer's: see on_policy_loss
        # on-policy KD (GKD): with probability `fraction` a batch is the student's own completions of its prompts
        self.on_policy = dict(self.dcfg.get("on_policy") or {}) if self.teachers else {}

    _PER_STEP = frozenset({"progress", "epoch", "terms", "target_share", "step_seeds", "samples"})

    def __setattr__(self, name: str, value: Any) -> None:
        """The trainer sets progress, epoch and terms on every step: plain attributes, so they skip
        nn.Module's search of its parameters, buffers and submodules."""
        if name in self._PER_STEP:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _projector(self, i: int, f: Dict[str, Any], s_shapes: Dict, t_shapes: Dict) -> nn.Module:
        """What stands between the student's layer and the loss: a projector to the teacher's width
        (`compares: width`), nothing (maps compared as they are, relations within the batch), or the
        method's own trainable module (`compares: embedding`: CRD's embeddings and memory banks)."""
        compares = LOSSES.tags(f["loss"]).get("compares")
        if compares in ("maps", "relations"):
            return nn.Identity()
        s_shape, t_shape = s_shapes[f["student"]], t_shapes[f["teacher"]]
        if compares == "embedding":
            from ..losses.contrastive import flat_width
            settings = self.dcfg.get(LOSSES.tags(f["loss"]).get("settings", ""), {})
            return LOSSES.get(f["loss"])(flat_width(s_shape), flat_width(t_shape), self.n_train, **settings)
        return Projector(f["projector"], s_shape[0] if len(s_shape) == 3 else s_shape[-1],
                         t_shape[0] if len(t_shape) == 3 else t_shape[-1], where=f"distill.features[{i}]")

    def projections(self) -> List[nn.Module]:
        """Per feature pair, what maps the student's features onto the teacher's (for the monitor's cosine):
        its projector, or the identity where the loss compares maps, relations or its own embeddings."""
        return [p if isinstance(p, Projector) else nn.Identity() for p in self.projectors]

    def get_extra_state(self) -> Dict[str, float]:
        return dict(self.strength)

    def set_extra_state(self, state: Dict[str, float]) -> None:
        self.strength.update(state)

    def current(self, name: str) -> float:
        """alpha or temperature now: the strength, moved towards `<name>_end` by the schedule."""
        sched = self.dcfg.get("schedule") or {}
        kind, start, end = sched.get(name, "constant"), self.strength[name], sched.get(f"{name}_end")
        if kind == "constant" or end is None:
            return start
        p = min(max(self.progress, 0.0), 1.0)
        shape = p if kind == "linear" else (1 - math.cos(math.pi * p)) / 2
        return start + (end - start) * shape

    def noised(self, x: torch.Tensor) -> torch.Tensor:
        """The student's input: token ids with a fraction masked (noise injection), else `x` itself.
        Drawn from the global torch RNG, which checkpoints save, so a resumed run masks the same tokens."""
        if not self.mask_fraction:
            return x
        s = self.student
        return mask_tokens(x, self.mask_fraction, s.mask_id, s.pad_id, s.special_ids)

    def logit_term(self, logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor,
                   weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The logit distillation term of `distill.method` at the current temperature: on z-scored logits
        with `distill.logit_standardize`, ramped up over the method's `warmup_epochs` (DKD's warm-up)."""
        if not isinstance(t_logits, torch.Tensor):  # top-k teacher outputs (a language model's cache)
            return self.logit_loss(logits, t_logits, self.current("temperature"), weights, **_masked(mask),
                                   **self.method_args)
        if t_logits.shape[-1] != logits.shape[-1] and self.dcfg.get("vocab_align") == "truncate":
            v = min(t_logits.shape[-1], logits.shape[-1])  # (same tokenizer, output layers padded differently)
            logits, t_logits = logits[..., :v], t_logits[..., :v]
        require_same_shape(self.method, logits, t_logits, self.dcfg.get("topk", 0))  # (every method)
        if not logits.numel():  # (no position to score in this micro-batch: nothing to learn, not 0/0)
            return logits.sum() * 0
        if self.dcfg.get("logit_standardize"):
            logits, t_logits = standardize(logits), standardize(t_logits)
        extra = {"labels": y} if self.method_labels else {}
        term = self.logit_loss(logits, t_logits, self.current("temperature"), weights, **_masked(mask), **extra,
                               **self.method_args)
        if self.warmup_epochs:
            term = term * min(self.epoch / self.warmup_epochs, 1.0)
        return term

    def teacher_outputs(self, x: torch.Tensor, idx: torch.Tensor) -> TeacherOutputs:
        return self.runtime.put(self.aggregate({name: source(x, idx) for name, source in self.teachers.items()}))

    def on_policy_now(self) -> bool:
        """Whether this step is on-policy (probability `on_policy.fraction`): one draw per optimizer step from
        the step's seed, the same on every process and micro-batch, so N processes train as one accumulating
        N (each process's global RNG differs); a resumed run draws it again. Outside the trainer (no step
        seeds), from the global RNG."""
        if not (self.on_policy.get("fraction") and self.training):
            return False
        if self.step_seeds is None:
            return float(torch.rand(())) < self.on_policy["fraction"]
        coin = torch.rand(2, generator=torch.Generator().manual_seed(self.step_seeds[0]))[1]
        return float(coin) < self.on_policy["fraction"]

    def student_samples(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch's prompts completed by the student itself (sampled at `on_policy.temperature`, seeded from
        the micro-batch's seed, or outside the trainer the global RNG, which checkpoints save), as inputs and
        targets: the targets are the student's tokens."""
        from ..data.completions import as_arrays
        from ..tasks.causal_lm import prompts_and_answers
        prompts, _ = prompts_and_answers(x.cpu(), y.cpu())
        op, s = self.on_policy, self.student
        gen = None if self.step_seeds is None else torch.Generator().manual_seed(self.step_seeds[1])
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))  # (the micro-batch's seeds are 2**31 apart)
        outs = s.complete(prompts, op["max_new_tokens"], op["temperature"], 1.0, seed)
        xa, ya = as_arrays([(p, ids or [s.eos_id]) for p, (ids, _) in zip(prompts, outs)], s.pad_id)
        return torch.from_numpy(xa).to(x.device), torch.from_numpy(ya).to(x.device)

    def per_target(self, term: torch.Tensor) -> torch.Tensor:
        """A term that is a mean over the micro-batch's targets (labelled samples, target tokens), reweighted so
        that the step's is the mean over all of its targets: the trainer weighs each micro-batch by its share of
        the step's samples, and `target_share` is its share of the targets over that (Hugging Face's
        num_items_in_batch). 1 when there is one micro-batch, or every sample has one target."""
        return term if self.target_share == 1.0 else term * self.target_share

    def on_policy_loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The divergence alone, teacher vs student, on the student's own completions (no gold tokens there):
        those the trainer had the student write for this micro-batch at the start of the step (`samples`), with
        `target_share` its share of the step's sampled tokens; else written now."""
        x, y = self.samples if self.samples is not None else self.student_samples(x, y)
        logits, y_kept, mask, keep = self.student_logits(x, y, y >= 0)
        t_out = self.teacher_outputs(x, idx)
        kd = self.logit_term(logits, (t_out if keep is None else at_positions(t_out, keep)).logits, y_kept, None, mask)
        kd = self.per_target(kd)  # (a mean over this micro-batch's sampled tokens, reweighted to the step's)
        self.terms = {}
        zero = kd.detach() * 0
        counts = {k: torch.zeros_like(v) for k, v in self.task.counts(logits, y_kept).items()}  # (no gold tokens)
        return kd, {"ce": zero, "kd": kd.detach(), "total": kd.detach(), **counts}

    def scored_positions(self, y: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """For a student that computes logits at chosen positions only (a causal LM): the positions with a
        target (and in `mask`), where every logit term is scored; None for other students (all positions)."""
        if not getattr(self.student, "selects_positions", False):
            return None
        keep = y >= 0
        return keep if mask is None else keep & mask.to(keep.device).bool()

    def padding_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The real (not padding) positions of a padded text batch, as a text classifier trims it (its sequence
        features are as wide); None for other students (a language model's batches say their own)."""
        pad = getattr(self.student, "pad_id", None)
        if pad is None or x.dtype != torch.long or getattr(self.student, "per_position", False):
            return None
        from ..models.hf import trim_padding
        return trim_padding(x, pad)[1].bool()

    def student_logits(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple:
        """(logits, the targets and mask they are scored against, the positions kept or None): at the scored
        positions only, flattened, when the student can (no mask is left then), else at every position."""
        keep = self.scored_positions(y, mask)
        if keep is None:
            return self.student(x), y, mask, None
        return self.student(x, positions=keep), y[keep], None, keep

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss and its parts (detached tensors: read back once per log line, not every step)."""
        if self.on_policy_now():
            return self.on_policy_loss(x, y, idx)
        x_student = self.noised(x)
        with self._capture as cap:
            logits, y_kept, mask_kept, keep = self.student_logits(x_student, y, mask)
        ce = _loss("ce")(logits, y_kept, **_masked(mask_kept))
        loss = self.per_target(ce)
        parts = {"ce": loss.detach(), **self.task.counts(logits, y_kept)}
        if not self.teachers:
            parts["total"] = parts["ce"]
            return loss, parts
        t_out = self.teacher_outputs(x_student if self.teacher_sees_noise else x, idx)
        if mask is None and t_out.mask is not None:  # (then the teacher's own mask says where it has outputs)
            mask = t_out.mask  # (features take it whole)
            mask_kept = mask if keep is None else mask.to(keep.device)[keep]
        if keep is not None:
            t_out = at_positions(t_out, keep)
        weights = confidence_weights(t_out.logits) if self.dcfg.get("sample_weight") == "confidence" else None
        kd = self.logit_term(logits, t_out.logits if t_out.dense else t_out, y_kept, weights, mask_kept)
        self.terms = {"kd": kd, "ce": ce}
        if getattr(self.student, "per_position", False):  # (a mean over the target tokens, as ce is)
            kd = self.per_target(kd)
        parts["kd"] = kd.detach()
        alpha = self.current("alpha")
        loss = (1 - alpha) * loss + alpha * kd
        padding = self.padding_mask(x_student) if mask is None and self.features else None
        for i, (f, proj) in enumerate(zip(self.features, self.projectors)):
            s_feat, t_feat = cap.outputs[f["student"]], t_out.features[f["teacher"]]
            # (a text classifier's sequence features are compared at the real tokens of each text, not its padding:
            # hidden states (N, L, D) by position, attention maps by query row)
            sequence = t_feat.dim() == 3 or f["loss"] in ("attention_kl", "attention_mse")
            where = padding if padding is not None and sequence else mask
            compares = LOSSES.tags(f["loss"]).get("compares")
            if compares == "embedding":  # the module is the loss (it holds its own trainable parts and state)
                term = proj(s_feat, t_feat, idx, **_masked(where))
            else:
                if compares == "width":
                    s_feat, t_feat = align(s_feat, t_feat, proj)
                heads_only = compares == "maps" and s_feat.dim() == t_feat.dim() == 4 and \
                    s_feat.shape[0] == t_feat.shape[0] and s_feat.shape[2:] == t_feat.shape[2:]  # (averaged over heads)
                if compares != "relations" and s_feat.shape != t_feat.shape and not heads_only:
                    raise UserError(f"distill.features[{i}]: student '{f['student']}' gives "
                                    f"{tuple(s_feat.shape[1:])} after the projector, teacher '{f['teacher']}' "
                                    f"gives {tuple(t_feat.shape[1:])}")
                term = _loss(f["loss"])(s_feat, t_feat, **_masked(where))
                if where is not None and where is mask and getattr(self.student, "per_position", False) \
                        and compares != "relations":  # (a mean over the target tokens, as ce is)
                    term = self.per_target(term)
            parts[f"feat{i}_{f['loss']}"] = term.detach()
            loss = loss + f["weight"] * self.strength["feature_scale"] * term
        parts["total"] = loss.detach()
        return loss, parts
