"""Pretraining the ToyWorld VLM (the EfficientVLM teacher) and the objectives every stage reuses.

Pretraining objectives (ALBEF §3, X-VLM §3): ITC on the [CLS]/[EOT] embeddings; ITM on the
fusion [CLS] with one hard negative text per image and one hard negative image per text, sampled
from the ITC similarities with the positive excluded; MLM on the fusion output with 25% of the
caption words masked (80% [MASK], 10% a random word, 10% unchanged). Batches are the toy CLIP's
(half random scenes, half groups that differ only in their shapes). Distillation
(:mod:`labkit.efficientvlm.distill`) and pruning (:mod:`labkit.efficientvlm.prune`) add their losses to these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit.clip.model import ClipModel
from labkit.clip.pretrain import PretrainBatches
from labkit.core.train import TrainConfig, fit, shorten
from labkit.efficientvlm.model import PAD_ID, ToyVLM, VLMConfig, VLMOutput, trim_padding

MLM_PROB = 0.25
FAST_STEPS = 3  # each EfficientVLM training loop in fast mode (LABKIT_FAST=1)


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
    torch.manual_seed(seed)
    model = ToyVLM.from_toy_clip(clip.model, VLMConfig(**cfg_overrides)).to(clip.device)
    new = ("encoders.fusion", "ln_fusion", "itm_head", "mlm_head")  # random init: a larger learning rate
    groups = [{"params": [p for n, p in model.named_parameters() if n.startswith(new) == is_new],
               "lr": lr * (new_lr_factor if is_new else 1.0), "weight_decay": 0.01} for is_new in (False, True)]
    steps = shorten(steps, FAST_STEPS)
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, out_dir=out_dir, desc="teacher", eval_every=max(1, steps // 4))
    record = fit(model, teacher_loss_fn, VLMBatches(clip, batch_size, seed), cfg, evaluate=evaluate,
                 device=clip.device, progress=progress, groups=groups)
    return model, record
