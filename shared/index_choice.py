"""Choose and build a FAISS index for one shard, by its size and a memory budget.

The choice is a ladder of early returns, like autofaiss's `get_optimal_index_keys_v2`: exact
search while it is cheap, HNSW while its graph fits in memory, then compressed IVF indexes. The
FAISS guidelines behind the numbers:
https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twinq.shared.errors import BadInput

if TYPE_CHECKING:
    import faiss
    import numpy as np

FLAT_THRESHOLD = 20_000
"""Below this many vectors a brute-force scan is fast (20k x 384 floats is ~1 ms a query) and exact."""

HNSW_M = 32
"""HNSW graph degree: 32 reaches R@1 0.98+ at efSearch 64 on SIFT1M (faiss bench_hnsw)."""

HNSW_EF_SEARCH = 128
"""Wider than the benchmark's 64 because we read the top 50 for reranking, not the top 1."""

HNSW_EF_SEARCH_LARGE = 512
LARGE_SHARD = 500_000
"""At 1M real-ish vectors efSearch 128 kept recall@10 at only 0.964 of Flat's, while 512 reached
0.984 at 10.7x Flat's speed (docs/performance.md): big graphs need the wider beam."""

IVF_TRAIN_POINTS_PER_CENTROID = 50
"""FAISS warns below 39 training points per centroid; 50 gives headroom."""

MAX_IVF_TRAIN = 200_000
"""Training k-means on more than this sample buys nothing measurable and costs minutes."""


@dataclass(frozen=True)
class IndexChoice:
    """An index factory key, why it was chosen, and the search-time parameters to apply."""

    key: str
    reason: str
    search_params: str = ""


def parse_bytes(text: str | int) -> int:
    """'16G', '512M', '2.5GB' or a plain number of bytes, parsed once at the edge."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise BadInput(f"not a memory size: {text!r} (use e.g. 512M or 4G)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def ivf_centroids(nb_vectors: int) -> int:
    """4*sqrt(n) clusters, rounded to a power of two, within [16, 65536]."""
    target = 4 * math.sqrt(max(nb_vectors, 1))
    return int(min(65536, max(16, 2 ** round(math.log2(target)))))


def _hnsw_bytes(nb_vectors: int, dim: int, m: int) -> int:
    # Vectors in fp32, plus about 2*M int32 neighbour ids per vector on the base level,
    # plus ~10% for the upper levels and bookkeeping.
    return int(nb_vectors * (4 * dim + 2 * m * 4) * 1.1)


def choose_index_key(
    nb_vectors: int,
    dim: int,
    max_index_bytes: int,
    *,
    flat_threshold: int = FLAT_THRESHOLD,
    hnsw_m: int = HNSW_M,
) -> list[IndexChoice]:
    """Rank index types for a shard; the first is the most promising.

    Args:
        nb_vectors: Vectors in the shard.
        dim: Their dimension.
        max_index_bytes: Memory budget for this shard's index (strict).
        flat_threshold: Use exact search below this many vectors. Defaults to 20,000.
        hnsw_m: HNSW degree. Defaults to 32.
    """
    # Exception cases first.
    if nb_vectors < flat_threshold and nb_vectors * dim * 4 <= max_index_bytes:
        return [IndexChoice("Flat", f"{nb_vectors} < {flat_threshold} vectors: exact search is cheap")]
    # General cases: the most accurate index that fits.
    choices: list[IndexChoice] = []
    if _hnsw_bytes(nb_vectors, dim, hnsw_m) <= max_index_bytes:
        ef = HNSW_EF_SEARCH_LARGE if nb_vectors >= LARGE_SHARD else HNSW_EF_SEARCH
        choices.append(IndexChoice(f"HNSW{hnsw_m},Flat", "HNSW graph and fp32 vectors fit the budget",
                                   f"efSearch={ef}"))
    nlist = ivf_centroids(nb_vectors)
    nprobe = max(8, min(nlist // 8, 256))
    if nb_vectors * (dim + 8) <= max_index_bytes:
        choices.append(IndexChoice(f"IVF{nlist},SQ8", "8-bit scalar codes fit the budget (4x smaller)",
                                   f"nprobe={nprobe}"))
    pq_m = max([m for m in (8, 16, 32, 48, 64, 96) if dim % m == 0 and m <= dim // 4], default=8)
    choices.append(IndexChoice(f"IVF{nlist},PQ{pq_m}", f"{pq_m}-byte PQ codes: the smallest option",
                               f"nprobe={nprobe}"))
    return choices


def train_size(key: str, nb_vectors: int) -> int:
    """How many vectors to train an IVF index on: enough per centroid, never the whole of a huge shard."""
    match = re.search(r"IVF(\d+)", key)
    if not match:
        return 0
    return min(nb_vectors, MAX_IVF_TRAIN, int(match.group(1)) * IVF_TRAIN_POINTS_PER_CENTROID)


def build_index(vectors: np.ndarray, key: str, *, seed: int = 0) -> faiss.Index:
    """Build an inner-product index (cosine on normalised vectors) whose ids are row numbers."""
    import faiss
    import numpy as np

    index = faiss.index_factory(vectors.shape[1], key, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        n_train = train_size(key, len(vectors))
        sample = np.random.default_rng(seed).choice(len(vectors), n_train, replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def apply_search_params(index: faiss.Index, params: str) -> None:
    """Apply `efSearch=..`/`nprobe=..` from the manifest to a loaded index."""
    if params:
        import faiss

        faiss.ParameterSpace().set_index_parameters(index, params)
