"""selfee_fast: fused kernels and a lean engine for SELFEE / Spread Preference Annotation."""

import os as _os

# Triton reads its interpreter switch when a kernel is decorated, so forward ours first.
if _os.environ.get("SELFEE_FAST_TRITON_INTERPRET", "0") == "1":
    _os.environ["TRITON_INTERPRET"] = "1"

from .dpo import FusedLinearDPOLoss
from .logprobs import LogProbs, linear_logprobs
from .loss import LOSS_TYPES, NoiseThreshold, SPALossOutput, spa_loss
from .preference import FusedLinearCPOLoss, FusedLinearORPOLoss, FusedLinearSimPOLoss

__all__ = [
    "LOSS_TYPES",
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
    "LogProbs",
    "NoiseThreshold",
    "SPALossOutput",
    "linear_logprobs",
    "spa_loss",
]
__version__ = "0.1.0"
