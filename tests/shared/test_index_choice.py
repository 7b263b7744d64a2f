from __future__ import annotations

import numpy as np
import pytest

from twinq.shared.errors import BadInput
from twinq.shared.index_choice import apply_search_params, build_index, choose_index_key, ivf_centroids, parse_bytes, train_size

G = 2**30


@pytest.mark.parametrize("n,dim,budget,key", [
    (0, 384, 4 * G, "Flat"),
    (19_999, 384, 4 * G, "Flat"),
    (20_000, 384, 4 * G, "HNSW32,Flat"),
    (1_000_000, 384, 4 * G, "HNSW32,Flat"),
    (5_000_000, 384, 4 * G, "IVF8192,SQ8"),
    (50_000_000, 384, 4 * G, "IVF32768,PQ96"),
    (10_000, 384, 1024, "IVF512,PQ96"),        # tiny budget: even a small shard compresses
    (1_000_000, 768, 1 * G, "IVF4096,SQ8"),
])
def test_choose_index_key_ladder(n: int, dim: int, budget: int, key: str) -> None:
    assert choose_index_key(n, dim, budget)[0].key == key


def test_choose_index_key_ranks_options_and_gives_reasons() -> None:
    choices = choose_index_key(100_000, 384, 4 * G)
    assert [c.key.split(",")[0][:4] for c in choices] == ["HNSW", "IVF1", "IVF1"]
    assert all(c.reason for c in choices) and choices[0].search_params == "efSearch=128"


@pytest.mark.parametrize("n,nlist", [(1, 16), (10_000, 512), (1_000_000, 4096), (10**10, 65536)])
def test_ivf_centroids(n: int, nlist: int) -> None:
    assert ivf_centroids(n) == nlist


@pytest.mark.parametrize("text,value", [("512M", 512 * 2**20), ("4G", 4 * G), ("1.5GB", int(1.5 * G)),
                                        ("100", 100), (7, 7)])
def test_parse_bytes(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_garbage() -> None:
    with pytest.raises(BadInput):
        parse_bytes("lots")


def test_train_size_caps_the_sample() -> None:
    assert train_size("Flat", 10**6) == 0
    assert train_size("IVF1024,SQ8", 10**6) == 51_200
    assert train_size("IVF1024,SQ8", 3_000) == 3_000


@pytest.mark.parametrize("key", ["Flat", "HNSW32,Flat", "IVF16,SQ8"])
def test_build_index_finds_each_vector_itself(key: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(vectors, key)
    apply_search_params(index, "nprobe=16" if key.startswith("IVF") else "")
    _, ids = index.search(vectors[:100], 1)
    assert index.ntotal == 2_000 and (ids[:, 0] == np.arange(100)).mean() >= 0.95


@pytest.mark.parametrize("n,params", [(100_000, "efSearch=128"), (499_999, "efSearch=128"),
                                      (500_000, "efSearch=512"), (1_000_000, "efSearch=512")])
def test_choose_index_key_widens_hnsw_beam_for_big_shards(n: int, params: str) -> None:
    assert choose_index_key(n, 384, 4 * G)[0].search_params == params
