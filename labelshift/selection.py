"""Label-free objectives of an adjustment setting, and how label-free choices compare with labelled ones.

A setting's decisions are ``argmax`` of its adjusted logits. Without target labels it is scored against the
model's own best guess of the target posterior, the *reference posterior*

    p̂(y|x) ∝ p_cal(y|x) · π_em(y) / π_cal(y)

(BCTS-calibrated posteriors moved from the prior they hold under, π_cal, to EM's estimate π_em: the fixed
point of EM). The objectives, all "higher is better", over the cells of the output-stride maps weighted by
the output pixels each cell covers:

- ``expected_miou``: the mIoU of the soft confusion ``Σ_x p̂(y=i|x)·1[d(x)=j]`` (the mIoU the setting would
  have if p̂ were the truth; percent);
- ``pseudo_miou``: the mIoU against the hard pseudo labels ``argmax p̂`` (percent);
- ``em_loglik``: the mean log-likelihood of the target images under the setting's target prior π_t,
  ``log Σ_y p_cal(y|x)·π_t(y)/π_cal(y)`` (EM maximises it; it sees only the prior, not T or τ);
- ``neg_entropy``: minus the mean entropy of the adjusted posterior ``softmax(z')`` (nats; sharper is
  "better", so it prefers small temperatures: a baseline, not a recommendation).

README "Sweeps" reports how often and by how much each one's choice loses against the labelled choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from labelshift.calibrate import Calibration
from labelshift.logit_cache import LogitCache


def miou_of_stack(matrices: np.ndarray) -> np.ndarray:
    """(..., K, K) confusions [true, predicted] -> (...) mIoU in percent (classes with an empty union left out)."""
    matrices = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(matrices, axis1=-2, axis2=-1)
    union = matrices.sum(-1) + matrices.sum(-2) - tp
    present = union > 0
    iou = np.where(present, tp / np.where(present, union, 1.0), 0.0)
    return 100.0 * iou.sum(-1) / np.maximum(present.sum(-1), 1)


def miou_of(matrix: np.ndarray) -> float:
    """mIoU in percent of a (K, K) confusion [true, predicted] (counts or soft masses); classes with an empty
    union are left out (NaN when every class is)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return float(miou_of_stack(matrix)) if matrix.any() else float("nan")


@dataclass
class ReferencePosterior:
    """Per image of a logit cache: calibrated posteriors p_cal (K, h, w) float16 and each cell's area (h·w,);
    π_cal (K,) the prior p_cal holds under, π_em (K,) EM's estimate."""

    calibrated: list[np.ndarray]
    areas: list[np.ndarray]
    calibrated_prior: np.ndarray
    em_prior: np.ndarray

    def posterior(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_cal, p̂) of image ``index``, each (K, h·w) float32."""
        calibrated = torch.from_numpy(np.array(self.calibrated[index], dtype=np.float32)).flatten(1)
        ratio = torch.from_numpy((self.em_prior / self.calibrated_prior).astype(np.float32))[:, None]
        moved = calibrated * ratio
        return calibrated, moved / moved.sum(0, keepdim=True).clamp_min(1e-30)


def reference_posterior(cache: LogitCache, calibration: Calibration, calibrated_prior: np.ndarray,
                        em_prior: np.ndarray) -> ReferencePosterior:
    """The reference posterior of every cached image (the calibration applied to the cached logits)."""
    calibrated = [calibration.apply(cache.low_res(index)[None])[0].softmax(0).to(torch.float16).numpy()
                  for index in range(len(cache))]
    areas = [cache.plan(index).block_area for index in range(len(cache))]
    return ReferencePosterior(calibrated, areas, np.asarray(calibrated_prior, np.float64),
                              np.asarray(em_prior, np.float64))


class LabelFreeScores:
    """Accumulates the label-free objectives of one setting image by image."""

    def __init__(self, reference: ReferencePosterior, target_prior: np.ndarray) -> None:
        self.reference = reference
        num_classes = len(reference.em_prior)
        self.prior_ratio = torch.from_numpy((np.asarray(target_prior) / reference.calibrated_prior)
                                            .astype(np.float32))[:, None]
        self.soft = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # [reference, decided]
        self.hard = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.loglik = self.entropy = self.area = 0.0

    def add(self, index: int, adjusted: torch.Tensor) -> None:
        """Add image ``index`` given its adjusted low-resolution logits (K, h, w)."""
        calibrated, posterior = self.reference.posterior(index)
        area = torch.from_numpy(self.reference.areas[index]).float()
        decided = adjusted.flatten(1).argmax(0)
        self.soft.index_add_(1, decided, (posterior * area).double())
        pseudo = posterior.argmax(0)
        num_classes = len(self.soft)
        self.hard += torch.bincount(pseudo * num_classes + decided, weights=area.double(),
                                    minlength=num_classes ** 2).reshape(num_classes, -1)
        likelihood = (calibrated * self.prior_ratio).sum(0).clamp_min(1e-30)
        self.loglik += float((likelihood.log() * area).sum())
        log_probs = adjusted.flatten(1).log_softmax(0)
        self.entropy += float((-(log_probs.exp() * log_probs).sum(0) * area).sum())
        self.area += float(area.sum())

    def result(self) -> dict[str, float]:
        return {"expected_miou": miou_of(self.soft.numpy()), "pseudo_miou": miou_of(self.hard.numpy()),
                "em_loglik": self.loglik / self.area, "neg_entropy": -self.entropy / self.area}


# ------------------------------------------------------------------------------------------- choices and regret
def best_index(scores: Sequence[float]) -> int:
    """The index of the highest finite score (the first on ties)."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isfinite(values), values, -np.inf)
    return int(np.argmax(values))


def paired_bootstrap_wins(candidate: np.ndarray, baseline: np.ndarray, replicates: int, seed: int) -> float:
    """The share of ``replicates`` bootstrap resamples of the images (the same resample for both) on which
    ``candidate`` has the higher mIoU. candidate, baseline: (N, K, K) per-image confusions of two settings on the
    same N images. Ties count as losses (a candidate equal to the baseline never wins)."""
    candidate, baseline = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if candidate.shape != baseline.shape or candidate.ndim != 3:
        raise ValueError(f"need two (N, K, K) stacks of equal shape, got {candidate.shape} and {baseline.shape}")
    images = len(candidate)
    weights = np.random.default_rng(seed).multinomial(images, np.full(images, 1.0 / images), size=replicates)
    gains = (miou_of_stack(np.einsum("rn,nij->rij", weights, candidate))
             - miou_of_stack(np.einsum("rn,nij->rij", weights, baseline)))
    return float(np.mean(gains > 0))


def regret_table(trials: Sequence[Mapping[str, float]], labelled: str, objectives: Sequence[str],
                 evaluation: str, chosen: int | None = None) -> dict[str, dict]:
    """For each label-free objective: the trial it chooses, whether that differs from the labelled choice, and
    the regret ``evaluation(labelled choice) − evaluation(its choice)`` (e.g. target-val mIoU points).

    ``trials``: one mapping per trial holding ``labelled``, each objective and ``evaluation`` (the evaluation
    only for the chosen trials is enough; others may lack it). ``chosen``: the labelled choice's index when a
    rule other than the best ``labelled`` score made it (e.g. the guarded choice)."""
    chosen = best_index([trial[labelled] for trial in trials]) if chosen is None else chosen
    table = {}
    for objective in objectives:
        pick = best_index([trial[objective] for trial in trials])
        table[objective] = {"trial": pick, "differs": pick != chosen,
                            "regret": float(trials[chosen][evaluation] - trials[pick][evaluation])}
    return table
