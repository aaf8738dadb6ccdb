"""Training the ToyWorld VLM three ways: teacher pretraining, distillation into a student, L0 pruning.

Pretraining objectives (ALBEF §3, X-VLM §3): ITC on the [CLS]/[EOT] embeddings; ITM on the
fusion [CLS] with one hard negative text per image and one hard negative image per text, sampled
from the ITC similarities with the positive excluded; MLM on the fusion output with 25% of the
caption words masked (80% [MASK], 10% a random word, 10% unchanged). Batches are the toy CLIP's
(half random scenes, half groups that differ only in their shapes).

EfficientVLM (:mod:`labkit.efficient`): the student learns from ``0.6 * task + 0.4 * KD``, KD
being hidden-state and attention-score MSE under the layer map plus ITM and MLM logits KL; the
pruning stage adds the Lagrangian on the gates' expected sparsity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import efficient as eff
from .clip import PretrainBatches
from .efficient_eval import trim_padding
from .models import ClipModel
from .train import TrainConfig, fit
from .vlm import MODALITIES, PAD_ID, ToyVLM, VLMOutput

__all__ = ["VLMBatches", "vlm_forward", "task_losses", "train_teacher", "make_student", "train_student",
           "PruningModel", "prune_student", "recover_pruned"]

MLM_PROB = 0.25
KD_WEIGHT, TASK_WEIGHT, IMAGE_HIDDEN_WEIGHT = 0.4, 0.6, 0.1  # EfficientVLM's GeneralDistill.py


class VLMBatches:
    """``make_batch(step, rank, world)`` -> ``((images, ids, mlm_ids, mlm_labels), n)``, deterministic in the step."""

    def __init__(self, clip: ClipModel, batch_size: int = 64, seed: int = 0, mask_id: int | None = None):
        self.scenes = PretrainBatches(clip, batch_size, seed=seed)
        self.seed = seed
        self.vocab = clip.tokenizer.vocab_size
        self.mask_id = self.vocab if mask_id is None else mask_id
        self.special = torch.tensor([PAD_ID, clip.tokenizer.ids["<sot>"], clip.tokenizer.ids["<eot>"]])

    def mask_words(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of caption words: returns (masked ids, labels with -100 where nothing is predicted)."""
        words = ~torch.isin(ids, self.special)
        chosen = words & (torch.rand(ids.shape, generator=generator) < MLM_PROB)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=generator)
        random_words = torch.randint(3, self.vocab - 1, ids.shape, generator=generator)
        masked = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_words, masked)
        return masked, labels

    def __call__(self, step: int, rank: int = 0, world: int = 1):
        (images, ids), n = self.scenes(step, rank, world)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * world + rank)
        ids = trim_padding(ids.cpu())
        mlm_ids, labels = self.mask_words(ids, generator)
        device = images.device
        return (images, ids.to(device), mlm_ids.to(device), labels.to(device)), n


@torch.no_grad()
def sample_negatives(sim: torch.Tensor, ids: torch.Tensor, hard_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image and one negative image per text.

    ALBEF §3.2 draws every negative from softmax(similarity); here a ``hard_share`` of the draw
    follows it and the rest is uniform, because on ToyWorld the hardest captions differ only in a
    shape word and an ITM head trained on those alone stays at chance for hundreds of steps on a
    CPU budget. The positive and any caption identical to it are never drawn.
    Returns ``(neg_text_for_image [B], neg_image_for_text [B])`` as indices.
    """
    same = (ids[:, None, :] == ids[None, :, :]).all(-1)
    same |= torch.eye(len(ids), dtype=torch.bool, device=ids.device)
    if same.all(1).any():
        raise ValueError("every caption in the batch is identical: no negative to sample")
    sim = sim.float()

    def draw(scores: torch.Tensor) -> torch.Tensor:
        hard = scores.masked_fill(same, float("-inf")).softmax(1)
        uniform = (~same).float() / (~same).sum(1, keepdim=True)
        return torch.multinomial(hard_share * hard + (1 - hard_share) * uniform, 1).squeeze(1)

    return draw(sim), draw(sim.T)


@dataclass
class VLMStepOutput:
    sim: torch.Tensor  # [B, B] image-to-text logits (scaled cosine)
    itm_logits: torch.Tensor  # [3B, 2]: positives, (image, negative text), (negative image, text)
    mlm_logits: torch.Tensor  # [M, V] at the masked positions
    negatives: tuple[torch.Tensor, torch.Tensor]
    encoders: dict[str, VLMOutput]


def vlm_forward(model: ToyVLM, batch, gates=None, need: bool = False, negatives=None) -> VLMStepOutput:
    """Every pretraining output of one batch; ``negatives`` reuses another model's draw (distillation)."""
    images, ids, mlm_ids, labels = batch
    image = model.encode_image(images, gates, need)
    text = model.encode_text(ids, gates, need)
    sim = model.logit_scale.exp() * model.image_embedding(image) @ model.text_embedding(text, ids).T
    neg_text, neg_image = negatives if negatives is not None else sample_negatives(sim, ids)
    masked = model.encode_text(mlm_ids, gates)
    fused = model.fuse(torch.cat([text.states, text.states[neg_text], text.states, masked.states]),
                       torch.cat([ids, ids[neg_text], ids, mlm_ids]),
                       torch.cat([image.states, image.states, image.states[neg_image], image.states]), gates, need)
    b = len(ids)
    itm_logits = model.itm_logits(VLMOutput(fused.states[: 3 * b]))
    mlm_logits = model.mlm_head(fused.states[3 * b:][labels != -100])
    return VLMStepOutput(sim, itm_logits, mlm_logits, (neg_text, neg_image),
                         {"vision": image, "text": text, "fusion": fused})


def task_losses(out: VLMStepOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """ITC (symmetric InfoNCE), ITM (2-way cross-entropy) and MLM (cross-entropy at masked words)."""
    b = out.sim.shape[0]
    target = torch.arange(b, device=out.sim.device)
    itc = (F.cross_entropy(out.sim, target) + F.cross_entropy(out.sim.T, target)) / 2
    itm_target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(target.device)
    itm = F.cross_entropy(out.itm_logits, itm_target)
    masked = labels[labels != -100]
    mlm = F.cross_entropy(out.mlm_logits, masked) if masked.numel() else out.mlm_logits.sum() * 0
    return {"itc": itc, "itm": itm, "mlm": mlm}


def teacher_loss_fn(model, batch):
    losses = task_losses(vlm_forward(model, batch), batch[3])
    return sum(losses.values()), {k: v.item() for k, v in losses.items()}


def train_teacher(clip: ClipModel, steps: int, batch_size: int = 64, lr: float = 1e-4, seed: int = 0,
                  out_dir: str | None = None, evaluate=None, progress: bool = True, new_lr_factor: float = 10.0,
                  **cfg_overrides) -> tuple[ToyVLM, dict]:
    """X-VLM-style pretraining of the teacher: towers from the toy CLIP (``lr``), new fusion and heads (``lr x 10``)."""
    from .vlm import VLMConfig

    torch.manual_seed(seed)
    model = ToyVLM.from_toy_clip(clip.model, VLMConfig(**cfg_overrides)).to(clip.device)
    new = ("encoders.fusion", "ln_fusion", "itm_head", "mlm_head")  # random init: a larger learning rate
    groups = [{"params": [p for n, p in model.named_parameters() if n.startswith(new) == is_new],
               "lr": lr * (new_lr_factor if is_new else 1.0), "weight_decay": 0.01} for is_new in (False, True)]
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, out_dir=out_dir, desc="teacher", eval_every=max(1, steps // 4))
    record = fit(model, teacher_loss_fn, VLMBatches(clip, batch_size, seed), cfg, evaluate=evaluate,
                 device=clip.device, progress=progress, groups=groups)
    return model, record


# ---------------------------------------------------------------- distillation

def make_student(teacher: ToyVLM, divisor: int = 2) -> ToyVLM:
    """A student with ``1/divisor`` of each encoder's layers, initialised from the teacher.

    Student layer i copies teacher layer i*k, the first layer of the block of k it replaces (it
    then sees, at init, the input that layer was trained on); every embedding, norm and head is
    copied. Measured on ToyWorld: after 600 distillation steps this init reaches retrieval R@1 0.80
    on 500 validation scenes, copying the block's last layer (i*k + k - 1) only 0.71.
    """
    cfg = copy.deepcopy(teacher.cfg)
    for m in MODALITIES:
        t = teacher.cfg.layers(m)
        if t % divisor:
            raise ValueError(f"the teacher's {m} encoder has {t} layers, not divisible by {divisor}")
        setattr(cfg, f"{m}_layers", t // divisor)
    cfg.sizes = {}
    student = ToyVLM(cfg).to(next(teacher.parameters()).device)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("encoders.")}
    student.load_state_dict(state, strict=False)
    for m in MODALITIES:
        hidden_map, _ = eff.layer_map(teacher.cfg.layers(m), cfg.layers(m))
        for i, t in enumerate(hidden_map[:-1]):
            student.encoders[m][i].load_state_dict(teacher.encoders[m][t].state_dict())
    return student


def distillation_loss(student: ToyVLM, teacher: ToyVLM, batch, gates=None, temperature: float = 1.0,
                      attention: bool = True):
    """EfficientVLM's total: 0.6 * (ITC + ITM + MLM) + 0.4 * (hidden + attention + logits KD).

    Logits KD covers ITM and MLM as in the official ``GeneralDistill.py``, plus the ITC similarity
    matrix (both directions): on ToyWorld, without it the student's zero-shot retrieval recovers
    far more slowly than its ITM accuracy (R@1 0.51 vs ITM 0.89 after 600 steps). ``attention=False``
    drops the attention-score MSE (for a finalized model, whose heads no longer match the teacher's).
    """
    with torch.no_grad():
        t_out = vlm_forward(teacher, batch, need=True)
    s_out = vlm_forward(student, batch, gates, need=True, negatives=t_out.negatives)
    task = task_losses(s_out, batch[3])
    kd = {"kd_itc": (eff.soft_cross_entropy(s_out.sim, t_out.sim, temperature)
                     + eff.soft_cross_entropy(s_out.sim.T, t_out.sim.T, temperature)) / 2,
          "kd_itm": eff.soft_cross_entropy(s_out.itm_logits, t_out.itm_logits, temperature),
          "kd_mlm": eff.soft_cross_entropy(s_out.mlm_logits, t_out.mlm_logits, temperature)}
    for m in MODALITIES:
        weight = IMAGE_HIDDEN_WEIGHT if m == "vision" else 1.0
        kd[f"kd_{m}_hidden"], kd[f"kd_{m}_attn"] = eff.representation_losses(s_out.encoders[m], t_out.encoders[m], weight,
                                                                            attention)
    total = TASK_WEIGHT * sum(task.values()) + KD_WEIGHT * sum(kd.values())
    return total, {**{k: v.item() for k, v in task.items()}, **{k: v.item() for k, v in kd.items()}}


def train_student(teacher: ToyVLM, clip: ClipModel, steps: int, batch_size: int = 64, lr: float = 2e-4,
                  seed: int = 0, out_dir: str | None = None, evaluate=None, progress: bool = True,
                  init: ToyVLM | None = None) -> tuple[ToyVLM, dict]:
    """Distil ``teacher`` into a half-depth student (EfficientVLM §3.1).

    The student starts from the teacher's mapped layers (:func:`make_student`), or from ``init``, an
    earlier student, to distil it further (a fresh schedule; pass another ``seed`` for fresh batches).
    """
    teacher.eval().requires_grad_(False)
    if init is not None and any(2 * init.cfg.layers(m) != teacher.cfg.layers(m) for m in MODALITIES):
        raise ValueError(f"init has {[init.cfg.layers(m) for m in MODALITIES]} (vision, text, fusion) layers, not half "
                         f"of the teacher's {[teacher.cfg.layers(m) for m in MODALITIES]}: it is not this teacher's student")
    student = make_student(teacher) if init is None else init
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, out_dir=out_dir, desc="student", eval_every=max(1, steps // 4))
    record = fit(student, lambda model, batch: distillation_loss(model, teacher, batch), VLMBatches(clip, batch_size, seed),
                 cfg, evaluate=evaluate, device=clip.device, progress=progress)
    return student, record


# ---------------------------------------------------------------- pruning

class PruningModel(nn.Module):
    """The student, its gates and the Lagrange multipliers, trained together by :func:`labkit.train.fit`."""

    def __init__(self, student: ToyVLM, init_keep: float = 0.8):
        super().__init__()
        self.student, self.gates, self.lagrangian = student, eff.Gates(student, init_keep), eff.Lagrangian()


def prune_student(student: ToyVLM, teacher: ToyVLM, clip: ClipModel, target: float, steps: int,
                  batch_size: int = 64, lr: float = 1e-4, gate_lr: float = 0.1, lambda_lr: float = 0.1,
                  warmup_fraction: float = 0.3, seed: int = 0, progress: bool = True,
                  recover_steps: int = 0) -> tuple[ToyVLM, dict]:
    """Modal-adaptive L0 pruning to one global ``target`` sparsity, then :func:`finalize`.

    The loss is the distillation loss of the gated student plus the Lagrangian; the target ramps
    up over ``warmup_fraction`` of the steps. The record logs, per step, the expected sparsity of
    each modality (the learned split), λ1, λ2 and the current target, plus gate snapshots.
    ``recover_steps`` > 0 then distils the finalized model from the teacher for that many steps
    (:func:`recover_pruned`); its record is ``record["recovery"]``.
    """
    if recover_steps < 0:
        raise ValueError(f"recover_steps must be >= 0, got {recover_steps}")
    target = eff.check_target(target)
    teacher.eval().requires_grad_(False)
    model = PruningModel(copy.deepcopy(student))
    warmup = int(steps * warmup_fraction)
    snapshots = []

    def loss_fn(m, batch):
        step = len(snapshots)
        gates = m.gates()
        loss, metrics = distillation_loss(m.student, teacher, batch, gates)
        expected = m.gates.expected_sparsity()
        t = eff.warmed_target(target, step, warmup)
        loss = loss + m.lagrangian(expected, t)
        split = {f"sparsity_{k}": 1 - v.item() / total for (k, v), total in
                 zip(m.gates.expected_params().items(), m.gates.total_params().values())}
        snapshots.append({n: torch.sigmoid(a.detach()).cpu() for n, a in zip(m.gates.names, m.gates.log_alpha)}
                         if step % max(1, steps // 20) == 0 or step == steps - 1 else None)
        return loss, {**metrics, **split, "expected_sparsity": expected.item(), "target": t,
                      "lambda_1": m.lagrangian.lambda_1.item(), "lambda_2": m.lagrangian.lambda_2.item()}

    groups = [{"params": list(model.student.parameters()), "lr": lr, "weight_decay": 0.0},
              {"params": list(model.gates.parameters()), "lr": gate_lr, "weight_decay": 0.0, "scheduled": False},
              {"params": list(model.lagrangian.parameters()), "lr": lambda_lr, "weight_decay": 0.0, "maximize": True,
               "scheduled": False}]  # gates and multipliers keep their learning rate to the end
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, warmup=0.0, desc=f"prune to {target:.2f}", grad_clip=None)
    record = fit(model, loss_fn, VLMBatches(clip, batch_size, seed), cfg, device=clip.device, progress=progress,
                 groups=groups)
    record["gate_snapshots"] = [(i, s) for i, s in enumerate(snapshots) if s is not None]
    record["sparsity_by_modality"] = model.gates.sparsity_by_modality()
    pruned = model.student
    record["sizes"] = eff.finalize(pruned, model.gates)
    if recover_steps:
        pruned, record["recovery"] = recover_pruned(pruned, teacher, clip, recover_steps, batch_size, lr, seed + 1,
                                                    progress)
    return pruned.eval(), record


def recover_pruned(pruned: ToyVLM, teacher: ToyVLM, clip: ClipModel, steps: int, batch_size: int = 64,
                   lr: float = 1e-4, seed: int = 0, progress: bool = True) -> tuple[ToyVLM, dict]:
    """Distil the finalized (smaller) model from the teacher for ``steps`` more steps, gates gone.

    The same loss as the student's (task + hidden-state and logits KD) minus the attention-score
    MSE, whose head count no longer matches; the removed heads and units stay removed.
    """
    teacher.eval().requires_grad_(False)
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, desc="recover", weight_decay=0.0)
    record = fit(pruned, lambda model, batch: distillation_loss(model, teacher, batch, attention=False),
                 VLMBatches(clip, batch_size, seed), cfg, device=clip.device, progress=progress)
    return pruned.eval(), record
