"""Names and numbers fixed by the competition, shared by every stage.

Label order everywhere in this package is ``TARGETS``: C1..C7 then
``patient_overall``, so an array of shape (N, 8) always means that order.
"""
from __future__ import annotations

VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
OVERALL = "patient_overall"
TARGETS: tuple[str, ...] = VERTEBRAE + (OVERALL,)
N_TARGETS = len(TARGETS)

STUDY_COL = "StudyInstanceUID"
ROW_ID_COL = "row_id"
PRED_COL = "fractured"
PREDICTION_TYPE_COL = "prediction_type"

# Metric weights depend on the TRUE label (positives weigh double).
VERTEBRA_WEIGHT_NEG = 1.0
VERTEBRA_WEIGHT_POS = 2.0
OVERALL_WEIGHT_NEG = 7.0
OVERALL_WEIGHT_POS = 14.0

# The metric clips to [1e-15, 1 - 1e-15]; submissions are clipped much harder so
# one confident mistake cannot cost ~34 nats on a row.
METRIC_CLIP = (1e-15, 1.0 - 1e-15)
PRED_CLIP = (1e-4, 1.0 - 1e-4)

# Two training studies commonly dropped as broken (reason unverified).
BROKEN_TRAIN_UIDS: tuple[str, ...] = (
    "1.2.826.0.1.3680043.20574",
    "1.2.826.0.1.3680043.29952",
)
