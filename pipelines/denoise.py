"""Vet mined negatives with a trained reranker: drop those it calls duplicates.

Why: on Quora many of the bi-encoder's near misses are duplicates nobody labelled. Read by hand,
56% of the recall stage's unlabelled first hits on the Quora BEIR queries were twins
(`benchmarks/failure_audit.py`), and removing the false-negative margin cost the reranker 2.2
nDCG@10 (docs/results.md section 4). The margin only catches candidates the bi-encoder itself
scores close to the twin; a cross-encoder reads both questions together and catches more. This is
RocketQA's "denoised hard negatives" (Qu et al. 2021): mine with the bi-encoder, then let a
cross-encoder veto the negatives it is confident are positives.

The teacher is a twinq reranker, so its ``training.json`` pair calibration turns logits into
duplicate probabilities and the threshold reads as one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from twinq.pipelines.mining import MiningResult
from twinq.shared.errors import BadInput

if TYPE_CHECKING:
    from twinq.shared.calibration import Calibration

log = logging.getLogger(__name__)


def teacher_calibration(teacher: str, threshold: float) -> Calibration:
    """The teacher's pair calibration, checked with the threshold before any mining starts.

    Raises:
        BadInput: the teacher has no calibration, or the threshold is not in (0, 1).
    """
    from twinq.shared.rerank_config import load_rerank_config

    if not 0.0 < threshold < 1.0:
        raise BadInput(f"--denoise-threshold must lie in (0, 1), got {threshold}")
    calibration = load_rerank_config(teacher).calibration
    if calibration is None:
        raise BadInput(f"--denoise-with {teacher}: no calibration in its training.json; give a "
                       "reranker trained by `twinq train reranker`")
    return calibration


def drop_likely_twins(mined: MiningResult, teacher: str, threshold: float = 0.5,
                      batch_size: int = 64) -> MiningResult:
    """Mined negatives whose calibrated duplicate probability under `teacher` is at most
    `threshold`.

    Args:
        mined: Groups from `twinq.pipelines.mining.mine_hard_negatives`.
        teacher: Folder of a reranker trained by twinq (it needs the calibration in its
            training.json).
        threshold: Negatives the teacher gives a higher probability are dropped. Defaults to 0.5.
        batch_size: Scoring batch size. Defaults to 64.

    Returns:
        A new `MiningResult`: the same anchors in the same order, each with the negatives kept;
        ``stats["denoised"]`` counts the dropped ones.

    Raises:
        BadInput: the teacher has no calibration, or the threshold is not in (0, 1).
    """
    from twinq.shared.models import load_cross_encoder
    from twinq.shared.rerank import score_pairs

    calibration = teacher_calibration(teacher, threshold)
    pairs = [(anchor.q1, text) for anchor, texts in mined.groups for text in texts]
    probability = calibration.predict_logits(
        score_pairs(load_cross_encoder(teacher), pairs, batch_size, scale="logit"))
    groups, i = [], 0
    for anchor, texts in mined.groups:
        kept = [t for t, p in zip(texts, probability[i:i + len(texts)]) if p <= threshold]
        groups.append((anchor, kept))
        i += len(texts)
    stats = {**mined.stats, "denoised": len(pairs) - sum(len(k) for _, k in groups)}
    log.info("denoised with %s: dropped %d of %d mined negatives (probability > %g)", teacher,
             stats["denoised"], len(pairs), threshold)
    return MiningResult(groups, stats)
