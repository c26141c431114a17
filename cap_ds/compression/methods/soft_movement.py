"""Soft movement pruning (Sanh et al. 2020): keep sigmoid(S) > threshold, with an L1 term on sigmoid(S) that
pushes scores down. The threshold ramps from ``initial_threshold`` to ``final_threshold`` and the run reaches
whatever sparsity ``final_lambda`` gives (the reference), or, with ``threshold_control``, the scheduler sets it each
step to the global quantile that gives the cubic schedule's sparsity."""

from __future__ import annotations

import torch

from cap_ds.compression.methods import masks
from cap_ds.compression.methods.base import PruningMethod, Ramp


class SoftMovement(PruningMethod):
    name = "soft_movement"
    learns_scores = True
    supports_threshold_control = True
    regularizes = True
    dense_threshold = 0.0  # sigmoid > 0 keeps everything

    def default_mask_init(self, threshold_control: bool) -> str:
        """Controlled: pruned from the ramp's first step, so the magnitude prior (zero-init scores collapse, as
        movement's do). Reference: constant, which its ``final_lambda`` calibration assumes."""
        return "magnitude" if threshold_control else "constant"

    def ratio_optional(self, tech) -> bool:
        return not tech.threshold_control  # the reference's sparsity comes from final_lambda

    def keep_mask(self, weight: torch.Tensor, scores: torch.Tensor | None, threshold: float,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
        if scores is None:
            raise ValueError(f"method {self.name!r} needs mask scores")
        return masks.ThresholdBinarizer.apply(scores, threshold)

    def sparse_threshold(self, tech, dense_ratio: float, ramp: Ramp) -> float:
        return ramp(tech.initial_threshold, tech.final_threshold)

    def regularization_lambda(self, tech, threshold: float, ramp: Ramp) -> float:
        """Proportional to the threshold (reference: lambda_final * t / t_final); controlled: the same as a
        schedule progress."""
        if tech.final_threshold == 0:
            return 0.0
        if tech.threshold_control:
            return tech.final_lambda * ramp(0.0, 1.0)
        return tech.final_lambda * threshold / tech.final_threshold

    def reaches_target(self, tech) -> bool:
        return tech.threshold_control

    def in_forward(self, layer) -> None:
        """The regulariser's mean sigmoid(S), and under ZeRO-3 the histogram threshold_control needs: the scores
        hold data only inside forward."""
        if not layer.training:
            return
        layer.last_regularization = torch.sigmoid(layer.mask_scores.float()).mean()
        if layer.track_scores and layer._scores_partitioned():
            layer.last_histogram = layer.score_histogram()
