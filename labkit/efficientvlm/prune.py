"""EfficientVLM's second step (Wang et al., ACL Findings 2023, §3.2): modal-adaptive pruning with
hard-concrete L0 gates (Louizos et al., ICLR 2018).

A gate sits on every attention head (self- and cross-attention) and every FFN unit of every layer of
every modality (:class:`Gates`). The expected sparsity is computed from parameter counts; a Lagrangian
(:class:`Lagrangian`) with multipliers trained by gradient *ascent* drives it to one global target, and
the split between vision, text and fusion is learned (:func:`prune_student`). :func:`finalize` turns the
gates into a deterministic mask and physically removes the pruned heads and units; :func:`recover_pruned`
distils the smaller model from the teacher for a few more steps.

The gate maths (eq. numbers from Louizos et al. §4):
    s = sigmoid((log u - log(1 - u) + log alpha) / beta),  u ~ U(0, 1)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)                        (stretched, hard-clipped)
    P(z != 0) = sigmoid(log alpha - beta * log(-gamma / zeta))          (expected L0, eq. 12)
with beta = 2/3, gamma = -0.1, zeta = 1.1 as in the paper and EfficientVLM's code.

Following the official code (swaggy-TN/EfficientVLM, ``efficient_models/*_l0_module.py``, itself CoFi's):

* Test-time gates (:func:`deterministic_mask`): per site, the ``round(E[#zeros])`` gates with the
  smallest log alpha are 0 and all others 1 (CoFi's ``_deterministic_z``), so a site's realised size
  is its expected size rounded. Louizos et al.'s own estimator (eq. 13, clamp(sigmoid(log alpha)
  (zeta - gamma) + gamma, 0, 1)) keeps every gate that is not saturated shut and leaves fractional
  gates: measured on the shipped student, its realised sparsity missed the expected one by up to 0.04.
* Initialisation (:class:`Gates`): heads start at keep (the official mean 10 is clamped to ln 100 after
  the first step; labkit starts at ln 100), FFN units at a drop rate of 0.5 (log alpha = 0).
* After every optimizer step log alpha is clamped to [ln 0.01, ln 100] (``constrain_parameters``).
* The multipliers start at 0 and are trained by gradient ascent with AdamW, as in the official code
  (plus dual restarts, below).

Departures, and why:

* Budget: the official recipe prunes for 10 epochs of COCO at learning rate 0.01 for gates and
  multipliers (one "reg_learning_rate"); labkit prunes for 800-1,000 steps, so its gates learn at 0.1 and
  its multipliers at 2.5. Measured on the shipped student: at 0.1 the multipliers lag the target ramp and
  a 0.7 target ends at 0.27 after 300 steps.
* Dual restarts (:meth:`Lagrangian.restart_`, Gallego-Posada et al., NeurIPS 2022), not in the official code.
  At 2.5 the multipliers behave like an integral controller: λ1 winds up while the expected sparsity lags
  the warm-up ramp, and the sparsity overshoots. Measured on the shipped student with 800 steps and the
  official plain ascent: a 0.7 target reached 0.755 (steps 526-626) before settling at 0.700; a 0.8
  target reached 0.80 at step 451, rose to 0.82 and stayed there to the end (gates at the clamp sample
  z = 0 and get no task gradient to reopen) while λ1 unwound from its peak of -745: realised 0.835.
  With λ1 reset to 0 once the target is reached: 0.803 at step 450, 0.797-0.799 from step 475 to 800,
  realised 0.813.
  ``dual_restart=False`` (``labkit train pruned --plain-lagrangian``) gives the official behaviour, with which
  the shipped checkpoint was pruned (``docs/efficientvlm.md``).
* Sites: labkit gates heads and FFN units; the official code can also gate whole layers and the
  hidden dimension (``head_layer``, ``mlp``, ``hidden``), which the paper's EfficientVLM does not use.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from labkit.clip.model import ClipModel
from labkit.core.train import TrainConfig, fit, shorten
from labkit.efficientvlm.distill import distillation_loss
from labkit.efficientvlm.model import ToyVLM
from labkit.efficientvlm.train import FAST_STEPS, VLMBatches

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor | None = None, beta: float = BETA,
                         gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """A hard-concrete gate sample in [0, 1] for each ``log_alpha`` (uniform noise ``u`` drawn if not given)."""
    if u is None:
        eps = 1e-6
        u = torch.rand_like(log_alpha).clamp(eps, 1 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """P(gate != 0) = sigmoid(log alpha - beta * log(-gamma / zeta)): the expected L0 norm of each gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def deterministic_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """The official test-time gates of one site: the ``round(E[#zeros])`` gates with the smallest log alpha
    are 0, all others 1 (CoFi's ``_deterministic_z``; E[#zeros] = sum of 1 - P(z != 0), eq. 12)."""
    n_zeros = round(float((1 - expected_l0(log_alpha.detach())).sum()))
    mask = torch.ones_like(log_alpha)
    if n_zeros:
        mask[log_alpha.detach().topk(n_zeros, largest=False).indices] = 0.0
    return mask


def site_unit_params(site: nn.Module) -> int:
    """Parameters removed with one head (q/k/v rows and biases, ``out`` columns) or one FFN unit."""
    if hasattr(site, "head_dim"):
        return site.head_dim * (2 * site.dim + 2 * site.kv_dim + 3)
    return 2 * site.dense_in.in_features + 1


LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # the official clamp after every step


class Gates(nn.Module):
    """One hard-concrete gate per attention head and FFN unit at every site of a model.

    ``model.sites()`` maps names like ``"vision.0.attn"`` to :class:`labkit.core.blocks.MultiHeadAttention`
    or :class:`labkit.core.blocks.FeedForwardBlock`; the modality is the first part of the name. Calling the
    module returns ``{site: gate}``: samples in training, the 0/1 :func:`deterministic_mask` in eval.
    Log alpha starts at ``head_log_alpha`` for heads and ``unit_log_alpha`` for FFN units (the official
    initialisation: heads kept, units at drop rate 0.5).
    """

    def __init__(self, model: nn.Module, head_log_alpha: float = LOG_ALPHA_RANGE[1], unit_log_alpha: float = 0.0):
        super().__init__()
        sites = model.sites()
        self.names = list(sites)
        sizes = model.sizes()
        init = {n: head_log_alpha if hasattr(sites[n], "head_dim") else unit_log_alpha for n in self.names}
        self.log_alpha = nn.ParameterList(nn.Parameter(torch.full((sizes[n],), float(init[n]))) for n in self.names)
        self.unit_params = [site_unit_params(sites[n]) for n in self.names]
        self.modalities = sorted({n.split(".")[0] for n in self.names})

    def forward(self) -> dict[str, torch.Tensor]:
        pick = hard_concrete_sample if self.training else deterministic_mask
        return {name: pick(a) for name, a in zip(self.names, self.log_alpha)}

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every log alpha to :data:`LOG_ALPHA_RANGE`, in place (the official ``constrain_parameters``)."""
        for a in self.log_alpha:
            a.clamp_(*LOG_ALPHA_RANGE)

    def _params(self, per_gate) -> dict[str, torch.Tensor]:
        out = {m: self.log_alpha[0].new_zeros(()) for m in self.modalities}
        for name, a, cost in zip(self.names, self.log_alpha, self.unit_params):
            out[name.split(".")[0]] = out[name.split(".")[0]] + cost * per_gate(a).sum()
        return out

    def total_params(self) -> dict[str, float]:
        """Prunable parameters per modality (every gate open)."""
        return {m: float(v) for m, v in self._params(torch.ones_like).items()}

    def expected_params(self) -> dict[str, torch.Tensor]:
        """Expected remaining prunable parameters per modality: sum of cost x P(gate != 0) (differentiable)."""
        return self._params(expected_l0)

    def expected_sparsity(self) -> torch.Tensor:
        """One global expected sparsity: 1 - expected remaining / all prunable parameters."""
        return 1 - sum(self.expected_params().values()) / sum(self.total_params().values())

    @torch.no_grad()
    def sparsity_by_modality(self, deterministic: bool = True) -> dict[str, float]:
        """Sparsity of each modality: of the deterministic mask (default) or expected under the gates."""
        total = self.total_params()
        kept = self._params(deterministic_mask) if deterministic else self.expected_params()
        return {m: 1 - float(kept[m]) / total[m] for m in self.modalities}


class Lagrangian(nn.Module):
    """λ1 (ŝ - t) + λ2 (ŝ - t)²: added to the loss; λ1, λ2 are trained by gradient *ascent* (``maximize=True``)."""

    def __init__(self):
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected_sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected_sparsity - target
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    @torch.no_grad()
    def restart_(self, expected_sparsity: float, target: float) -> None:
        """Dual restart (Gallego-Posada et al., NeurIPS 2022): once the constraint ŝ >= t holds, λ1 is reset to 0;
        while it does not, λ1 is kept <= 0, the sign that pushes sparsity up.

        Without it λ1 integrates the gap for as long as the expected sparsity lags the warm-up ramp, so it reaches
        the target with a multiplier far larger than holding it needs and overshoots; gates driven to the clamp
        then sample z = 0 and get no task gradient to reopen them, so the overshoot persists until λ1 has unwound.
        """
        if expected_sparsity >= target:
            self.lambda_1.zero_()
        else:
            self.lambda_1.clamp_(max=0.0)


def check_target(target: float) -> float:
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    return float(target)


def warmed_target(target: float, step: int, warmup_steps: int) -> float:
    """The target ramps linearly from 0 to ``target`` over ``warmup_steps`` (CoFi / EfficientVLM)."""
    return target * min(1.0, step / max(1, warmup_steps))


@torch.no_grad()
def finalize(model: nn.Module, gates: Gates) -> dict[str, int]:
    """Physically remove the heads and units whose :func:`deterministic_mask` is 0, in place.

    The kept gates are exactly 1, so the smaller model computes exactly what the masked model computed.
    Returns the new size of every site.
    """
    sites = model.sites()
    for name, mask in gates.eval()().items():
        site, keep = sites[name], mask > 0
        if hasattr(site, "head_dim"):
            site.prune_heads(keep)
        else:
            site.prune_units(keep)
    return model.sizes()


class PruningModel(nn.Module):
    """The student, its gates and the Lagrange multipliers, trained together by :func:`labkit.core.train.fit`."""

    def __init__(self, student: ToyVLM):
        super().__init__()
        self.student, self.gates, self.lagrangian = student, Gates(student), Lagrangian()


def prune_student(student: ToyVLM, teacher: ToyVLM, clip: ClipModel, target: float, steps: int,
                  batch_size: int = 64, lr: float = 1e-4, gate_lr: float = 0.1, lambda_lr: float = 2.5,
                  warmup_fraction: float = 0.3, seed: int = 0, progress: bool = True,
                  recover_steps: int = 0, dual_restart: bool = True) -> tuple[ToyVLM, dict]:
    """Modal-adaptive L0 pruning to one global ``target`` sparsity, then :func:`finalize`.

    The loss is the distillation loss of the gated student plus the Lagrangian; the target ramps
    up over ``warmup_fraction`` of the steps. The record logs, per step, the expected sparsity of
    each modality (the learned split), λ1, λ2 and the current target, plus gate snapshots.
    ``recover_steps`` > 0 then distils the finalized model from the teacher for that many steps
    (:func:`recover_pruned`); its record is ``record["recovery"]``. ``dual_restart=False`` trains the
    multipliers as the official code does, without :meth:`Lagrangian.restart_` (the shipped checkpoint's recipe).
    """
    steps = shorten(steps, FAST_STEPS)
    recover_steps = shorten(recover_steps, FAST_STEPS)
    if recover_steps < 0:
        raise ValueError(f"recover_steps must be >= 0, got {recover_steps}")
    target = check_target(target)
    teacher.eval().requires_grad_(False)
    model = PruningModel(copy.deepcopy(student))
    warmup = int(steps * warmup_fraction)
    snapshots = []

    def loss_fn(m, batch):
        step = len(snapshots)
        gates = m.gates()
        loss, metrics = distillation_loss(m.student, teacher, batch, gates)
        expected = m.gates.expected_sparsity()
        t = warmed_target(target, step, warmup)
        loss = loss + m.lagrangian(expected, t)
        split = {f"sparsity_{k}": 1 - v.item() / total for (k, v), total in
                 zip(m.gates.expected_params().items(), m.gates.total_params().values())}
        snapshots.append({n: torch.sigmoid(a.detach()).cpu() for n, a in zip(m.gates.names, m.gates.log_alpha)}
                         if step % max(1, steps // 20) == 0 or step == steps - 1 else None)
        return loss, {**metrics, **split, "expected_sparsity": expected.item(), "target": t,
                      "lambda_1": m.lagrangian.lambda_1.item(), "lambda_2": m.lagrangian.lambda_2.item()}

    def after_step(m):
        m.gates.clamp_()
        if dual_restart:  # the target the next step will use
            m.lagrangian.restart_(m.gates.expected_sparsity().item(), warmed_target(target, len(snapshots), warmup))

    groups = [{"params": list(model.student.parameters()), "lr": lr, "weight_decay": 0.0},
              {"params": list(model.gates.parameters()), "lr": gate_lr, "weight_decay": 0.0, "scheduled": False},
              {"params": list(model.lagrangian.parameters()), "lr": lambda_lr, "weight_decay": 0.0, "maximize": True,
               "scheduled": False}]  # gates and multipliers keep their learning rate to the end
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, warmup=0.0, desc=f"prune to {target:.2f}", grad_clip=None)
    record = fit(model, loss_fn, VLMBatches(clip, batch_size, seed), cfg, device=clip.device, progress=progress,
                 groups=groups, after_step=after_step)
    record["gate_snapshots"] = [(i, s) for i, s in enumerate(snapshots) if s is not None]
    record["sparsity_by_modality"] = model.gates.sparsity_by_modality()
    pruned = model.student
    record["sizes"] = finalize(pruned, model.gates)
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
    steps = shorten(steps, FAST_STEPS)
    teacher.eval().requires_grad_(False)
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, desc="recover", weight_decay=0.0)
    record = fit(pruned, lambda model, batch: distillation_loss(model, teacher, batch, attention=False),
                 VLMBatches(clip, batch_size, seed), cfg, device=clip.device, progress=progress)
    return pruned.eval(), record
