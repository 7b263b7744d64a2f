"""Build a BEIR-format Quora retrieval set, a cluster-disjoint training file and a clean test set.

Reads the reference data (``$TWINQ_DATA``, default ``../shared/data`` next to the repo) and writes
to OUT (default ``runs/quora-beir``, gitignored; never commit data):

- ``corpus.jsonl``: every distinct question of quora/duplicate-pairs (``_id``, ``text``);
- ``queries.jsonl`` + ``qrels/test.tsv``: one query per held-out cluster; its relevant documents
  are the other members of its cluster (BEIR Quora rule: the query is in the corpus, and the
  evaluator drops its own id);
- ``train_pairs.tsv``: ``q1 \\t q2`` positives from clusters that share no question with the
  queries' clusters or with the labelled test file;
- ``labelled_test.tsv``: quora/labelled/dev.tsv (Quora format), whose questions are disjoint
  from ``train_pairs.tsv``;
- ``labelled_train.tsv`` + ``labelled_heldout.tsv``: the same file halved by cluster, so that its
  human-labelled non-duplicates can train a reranker and the other half still tests it;
- optionally (``--snapshot-root``) a published twinq snapshot of the corpus, embedded with the
  bundled bi-encoder through the same snapshot API the index pipeline uses.

Clusters are union-find components over all positive pairs of both sources, so a test question's
paraphrases never reach training.

Example:
    python benchmarks/build_quora_beir.py --out runs/quora-beir --queries 1000 \\
        --snapshot-root runs/quora-snap
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twinq.pipelines.splits import build_clusters, question_key  # noqa: E402
from twinq.shared.pairs import LabelledPair, read_pairs  # noqa: E402
from twinq.shared.text import normalize_text  # noqa: E402

log = logging.getLogger("build_quora_beir")


def data_dir() -> Path:
    return Path(os.environ.get("TWINQ_DATA", REPO.parent / "shared" / "data"))


def build(out: Path, n_queries: int, seed: int) -> dict[str, int]:
    """Write corpus, queries, qrels, training and test files; return their counts."""
    data = data_dir()
    dup = read_pairs([data / "quora/duplicate-pairs/train", data / "quora/duplicate-pairs/test"])
    labelled = read_pairs(data / "quora/labelled/dev.tsv")
    clusters = build_clusters(dup.pairs + labelled.pairs)

    corpus: dict[str, tuple[str, str]] = {}  # key -> (id, text)
    for p in dup.pairs:
        for q in (p.q1, p.q2):
            key = question_key(q)
            if key not in corpus:
                corpus[key] = (f"q{len(corpus)}", normalize_text(q))
    members: dict[int, list[str]] = {}
    for key in corpus:
        members.setdefault(clusters[key], []).append(key)

    held: set[int] = {clusters[question_key(q)] for p in labelled.pairs for q in (p.q1, p.q2)}
    candidates = sorted(c for c, m in members.items() if len(m) >= 2)
    rng = random.Random(seed)
    rng.shuffle(candidates)
    query_clusters = candidates[:n_queries]
    held.update(query_clusters)

    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for doc_id, text in corpus.values():
            fh.write(json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False) + "\n")
    n_qrels = 0
    with open(out / "queries.jsonl", "w", encoding="utf-8") as fq, \
            open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for cid in query_clusters:
            keys = members[cid]
            query_key = keys[rng.randrange(len(keys))]
            qid, qtext = corpus[query_key]
            fq.write(json.dumps({"_id": qid, "text": qtext}, ensure_ascii=False) + "\n")
            for key in keys:
                if key != query_key:
                    fr.write(f"{qid}\t{corpus[key][0]}\t1\n")
                    n_qrels += 1
    train: list[LabelledPair] = [p for p in dup.pairs if clusters[question_key(p.q1)] not in held]
    seen: set[tuple[str, str]] = set()
    n_train = 0
    with open(out / "train_pairs.tsv", "w", encoding="utf-8") as fh:
        for p in train:
            key = (question_key(p.q1), question_key(p.q2))
            if key in seen or key[0] == key[1]:
                continue
            seen.add(key)
            fh.write(f"{normalize_text(p.q1)}\t{normalize_text(p.q2)}\n")
            n_train += 1
    with open(out / "labelled_test.tsv", "w", encoding="utf-8") as fh:
        for i, p in enumerate(labelled.pairs):
            fh.write(f"{p.label}\t{normalize_text(p.q1)}\t{normalize_text(p.q2)}\t{i}\n")
    halves = split_labelled(labelled.pairs, clusters, set(query_clusters), seed)
    for name, rows in halves.items():
        with open(out / f"labelled_{name}.tsv", "w", encoding="utf-8") as fh:
            for i, p in rows:
                fh.write(f"{p.label}\t{normalize_text(p.q1)}\t{normalize_text(p.q2)}\t{i}\n")
    counts = {"corpus": len(corpus), "queries": len(query_clusters), "qrels": n_qrels,
              "train_pairs": n_train, "labelled_test": len(labelled.pairs),
              **{f"labelled_{name}": len(rows) for name, rows in halves.items()},
              "held_clusters": len(held), "clusters": len(members)}
    (out / "build.json").write_text(json.dumps({"seed": seed, "counts": counts}, indent=2))
    return counts


def split_labelled(pairs: list[LabelledPair], clusters: dict[str, int], query_clusters: set[int],
                   seed: int) -> dict[str, list[tuple[int, LabelledPair]]]:
    """Halve the human-labelled pairs by cluster: `train` (its non-duplicates are the hard negatives
    a reranker learns "same topic, different question" from) and `heldout` (the pair test).

    A cluster (over every positive pair of both sources) lands wholly on one side; a pair whose
    questions fall on different sides is dropped, and no pair touching a retrieval query's cluster
    reaches `train`.
    """
    ids = sorted({clusters[question_key(q)] for p in pairs for q in (p.q1, p.q2)})
    random.Random(seed + 1).shuffle(ids)
    train_side = set(ids[: len(ids) // 2]) - query_clusters
    halves: dict[str, list[tuple[int, LabelledPair]]] = {"train": [], "heldout": []}
    for i, p in enumerate(pairs):
        sides = {clusters[question_key(q)] in train_side for q in (p.q1, p.q2)}
        if len(sides) == 1:
            halves["train" if sides.pop() else "heldout"].append((i, p))
    return halves


def write_snapshot(corpus_path: Path, root: Path, shards: int = 4, batch_size: int = 128) -> str:
    """Embed the corpus with the bundled bi-encoder and publish a Flat-index snapshot."""
    import numpy as np
    import pyarrow as pa

    from twinq.shared import snapshot as snap
    from twinq.shared.constants import DEFAULT_MODEL, SNAPSHOT_FORMAT_VERSION
    from twinq.shared.models import load_bi_encoder
    from twinq.shared.snapshot_schema import schema
    from twinq.shared.text import stable_shard, text_key

    docs = [json.loads(line) for line in corpus_path.read_text(encoding="utf-8").splitlines()]
    model = load_bi_encoder(None)
    start = time.perf_counter()
    order = np.argsort([len(d["text"]) for d in docs])  # less padding per batch
    vectors = np.zeros((len(docs), model.get_sentence_embedding_dimension()), np.float32)
    vectors[order] = model.encode([docs[i]["text"] for i in order], batch_size=batch_size,
                                  normalize_embeddings=True, convert_to_numpy=True,
                                  show_progress_bar=True)
    embed_s = time.perf_counter() - start
    version = snap.new_version(root)
    path = snap.version_dir(root, version)
    snap.mark_building(root, version)
    rows: list[list[dict]] = [[] for _ in range(shards)]
    for doc, vec in zip(docs, vectors):
        rows[stable_shard(doc["_id"], shards)].append({
            "id": doc["_id"], "ids": [doc["_id"]], "text": doc["text"],
            "text_key": text_key(doc["text"], DEFAULT_MODEL), "metadata": "{}",
            "embedding": vec.tolist()})
    entries = [snap.write_shard(path, s, pa.Table.from_pylist(r, schema=schema(vectors.shape[1])),
                                "Flat", "benchmark: exact search", "") for s, r in enumerate(rows)]
    snap.write_manifest(root, version, {
        "format_version": SNAPSHOT_FORMAT_VERSION, "version": version, "created_at": snap.now_iso(),
        "model": {"name": DEFAULT_MODEL, "dimension": int(vectors.shape[1]), "normalized": True,
                  "max_seq_length": int(model.max_seq_length)},
        "corpus": {"sources": [str(corpus_path)], "rows_read": len(docs), "rows_rejected": 0,
                   "rows_indexed": len(docs), "rows_reused": 0, "fingerprint": uuid.uuid4().hex},
        "shards": entries, "build": {"runner": "benchmarks/build_quora_beir.py",
                                     "stages_s": {"embed": round(embed_s, 1)}}})
    snap.publish(root, version)
    log.info("published snapshot %s (%d rows, embed %.0fs)", version, len(docs), embed_s)
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quora-beir")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query clusters")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--snapshot-root", type=Path, default=None,
                        help="also embed the corpus and publish a snapshot here")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    counts = build(args.out, args.queries, args.seed)
    log.info("wrote %s: %s", args.out, counts)
    if args.snapshot_root:
        from twinq.shared.models import set_threads

        set_threads(args.threads)
        write_snapshot(args.out / "corpus.jsonl", args.snapshot_root, args.shards)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
