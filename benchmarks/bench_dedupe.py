"""Benchmark: `twinq dedupe` on Quora's duplicate clusters, against sentence-transformers'
`community_detection` on the same embeddings, measured in the same run.

    nice .venv/bin/python benchmarks/bench_dedupe.py --root runs/quora-snap \\
        --reranker runs/ablation/mid-easy --out runs/bench-dedupe          # all 70k questions
    nice .venv/bin/python benchmarks/bench_dedupe.py --questions 3000 --out runs/bench-dedupe-3k

Ground truth: the connected components of the Quora duplicate pairs in $TWINQ_DATA (default
../shared/data, never copied here), matched to the snapshot's rows by normalised, case-folded
text. With --questions N, whole true clusters are sampled until N questions, and a snapshot of
them is written from the stored vectors (nothing is embedded again).

Each `twinq dedupe` run is a subprocess (wall time and peak RSS from wait4): recall only, and
with the reranker. From each run's pairs.parquet the clusters are recomputed across thresholds,
with the chaining guard (centre), without its veto, and as plain connected components.
`community_detection` (min_community_size=2) runs on the very vectors the snapshot stores, over
a threshold sweep; its time and peak RSS are measured in subprocesses at several corpus sizes and
extrapolated to the size that would fill this machine's memory.

Goals (issue 23): all Quora questions with the reranker in <= 15 minutes on 2 cores; pairwise F1
above community_detection's at its best threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, machine  # noqa: E402

log = logging.getLogger("bench_dedupe")
CD_THRESHOLDS = [round(0.70 + 0.04 * i, 2) for i in range(7)]
"""community_detection's coarse threshold grid (0.70 to 0.94); the best one is then refined by
0.02 either side. One call over 70k questions takes minutes, so the grid is not finer."""
SCORES = ("pairwise_precision", "pairwise_recall", "pairwise_f1", "bcubed_f1")


# ----------------------------------------------------------------------------- data

def load_rows(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, texts, vectors) of every row of the published snapshot, in shard order."""
    import pyarrow.parquet as pq

    from twinq.shared import snapshot as snap

    version = snap.current_version(root)
    path = snap.version_dir(root, version)
    ids, texts, vectors = [], [], []
    for entry in snap.read_manifest(path)["shards"]:
        table = pq.read_table(path / entry["data_file"], columns=["id", "text", "embedding"])
        ids += table.column("id").to_pylist()
        texts += table.column("text").to_pylist()
        vectors.append(snap.embeddings_of(table))
    return ids, texts, np.concatenate(vectors)


def truth_labels(texts: list[str]) -> np.ndarray:
    """Each row's true cluster: connected components of the Quora duplicate pairs."""
    from twinq.pipelines.splits import build_clusters, question_key
    from twinq.shared.pairs import read_pairs

    folder = DATA / "quora" / "duplicate-pairs"
    if not folder.is_dir():
        raise SystemExit(f"reference data not found at {folder}; set TWINQ_DATA")
    clusters = build_clusters(read_pairs([folder / "train", folder / "test"]).pairs)
    fresh = iter(range(len(clusters) + 1, len(clusters) + 1 + len(texts)))
    return np.array([clusters.get(question_key(t), next(fresh)) for t in texts], dtype=np.int64)


def sample_clusters(truth: Truth, questions: int, seed: int) -> np.ndarray:
    """Row numbers of whole true clusters, in random cluster order, until `questions` rows."""
    by_cluster: dict[int, list[int]] = {}
    for row, label in enumerate(truth.tolist()):
        by_cluster.setdefault(label, []).append(row)
    order = sorted(by_cluster)
    random.Random(seed).shuffle(order)
    rows: list[int] = []
    for label in order:
        if len(rows) >= questions:
            break
        rows += by_cluster[label]
    return np.array(sorted(rows), dtype=np.int64)


def write_subset(root: Path, ids: list[str], texts: list[str], vectors: np.ndarray,
                 model_name: str, shards: int = 4) -> None:
    """Publish a snapshot of the given rows with their stored vectors (Flat indexes)."""
    import pyarrow as pa

    from twinq.shared import snapshot as snap
    from twinq.shared.constants import SNAPSHOT_FORMAT_VERSION
    from twinq.shared.snapshot_schema import schema
    from twinq.shared.text import stable_shard, text_key

    version = snap.new_version(root)
    path = snap.version_dir(root, version)
    snap.mark_building(root, version)
    rows: list[list[dict[str, Any]]] = [[] for _ in range(shards)]
    for doc_id, text, vec in zip(ids, texts, vectors):
        rows[stable_shard(doc_id, shards)].append({
            "id": doc_id, "ids": [doc_id], "text": text, "text_key": text_key(text, model_name),
            "metadata": "{}", "embedding": vec.tolist()})
    entries = [snap.write_shard(path, s, pa.Table.from_pylist(r, schema=schema(vectors.shape[1])),
                                "Flat", "benchmark subset", "") for s, r in enumerate(rows)]
    snap.write_manifest(root, version, {
        "format_version": SNAPSHOT_FORMAT_VERSION, "version": version, "created_at": snap.now_iso(),
        "model": {"name": model_name, "dimension": int(vectors.shape[1]), "normalized": True,
                  "max_seq_length": 256},
        "corpus": {"sources": ["benchmarks/bench_dedupe.py"], "rows_read": len(ids),
                   "rows_rejected": 0, "rows_indexed": len(ids), "rows_reused": len(ids),
                   "fingerprint": uuid.uuid4().hex},
        "shards": entries, "build": {"runner": "benchmarks/bench_dedupe.py", "stages_s": {}}})
    snap.publish(root, version)


# ----------------------------------------------------------------------------- measuring

def measured(cmd: list[str], log_path: Path) -> dict[str, float]:
    """Run a command under /usr/bin/time: its wall seconds and peak RSS in MiB.

    (wait4's ru_maxrss would not do: a child forked from this large process starts with this
    process's high-water mark.)
    """
    with log_path.open("w") as fh:
        code = subprocess.call(["/usr/bin/time", "-f", "TWINQ_TIME %e %M", *cmd], stdout=fh,
                               stderr=subprocess.STDOUT, cwd=REPO)
    text = log_path.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log_path}:\n{text[-2000:]}")
    line = [x for x in text.splitlines() if x.startswith("TWINQ_TIME ")][-1]
    seconds, kib = line.split()[1:]
    return {"seconds": round(float(seconds), 2), "peak_rss_mib": round(int(kib) / 1024, 1)}


@dataclass
class Truth:
    """True cluster labels of the rows, and which rows no training file holds (held out)."""

    labels: np.ndarray
    heldout: np.ndarray


def seen_questions(files: list[Path]) -> set[str]:
    """Question keys of every pair file a reranker may have trained on."""
    from twinq.pipelines.splits import question_key
    from twinq.shared.pairs import read_pairs

    existing = [f for f in files if f.is_file()]
    return {question_key(q) for p in (read_pairs(existing).pairs if existing else [])
            for q in (p.q1, p.q2)}


def scores_of(labels: np.ndarray, truth: Truth) -> dict[str, float]:
    """Pairwise and B-cubed scores on every row, and (``heldout_*``) on the held-out rows only:
    the reranker never saw those questions in training."""
    from twinq.pipelines.dedupe_metrics import cluster_scores

    scores = {k: round(v, 4) for k, v in cluster_scores(labels, truth.labels).items()
              if k in SCORES}
    if truth.heldout.any():
        held = cluster_scores(labels[truth.heldout], truth.labels[truth.heldout])
        scores.update({f"heldout_{k}": round(held[k], 4) for k in SCORES})
    return scores


def endpoint_margins(a: np.ndarray, b: np.ndarray, values: np.ndarray, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's value minus the best value among the other scored pairs of its first (and
    of its second) question: the margin a hit has over the next candidate when that question
    is asked as a query. 0 for a question with one scored pair."""
    node = np.concatenate([a, b])
    pair = np.concatenate([np.arange(len(values))] * 2)
    value = np.concatenate([values, values])
    order = np.lexsort((-value, node))
    node, pair, value = node[order], pair[order], value[order]
    start = np.r_[0, np.flatnonzero(np.diff(node)) + 1]
    first, first_pair = np.full(n, np.nan), np.full(n, -1)
    second = np.full(n, np.nan)
    first[node[start]], first_pair[node[start]] = value[start], pair[start]
    has_second = np.append(start[1:] - start[:-1] > 1, len(node) - start[-1] > 1)
    second[node[start[has_second]]] = value[start[has_second] + 1]
    margins = []
    for end in (a, b):
        other = np.where(first_pair[end] == np.arange(len(values)), second[end], first[end])
        margins.append(np.where(np.isnan(other), 0.0, values - other))
    return margins[0], margins[1]


def score_maps(pairs: Any, a: np.ndarray, b: np.ndarray, n: int, reranker: str
               ) -> dict[str, np.ndarray]:
    """Other edge scores from the same reranked pairs, to compare with the pair calibration:
    the twin decision model with each question asked as a query (margins over its other scored
    candidates; the larger of the two views), and an even z-score mix of cosine and logit."""
    from twinq.shared.calibration import FEATURES
    from twinq.shared.rerank_config import load_rerank_config

    decision = load_rerank_config(reranker).decision
    recall = pairs.column("recall").to_numpy().astype(np.float64)
    logit = pairs.column("rerank").to_numpy().astype(np.float64)
    views = []
    for rerank_margin, recall_margin in zip(endpoint_margins(a, b, logit, n),
                                            endpoint_margins(a, b, recall, n)):
        features = np.zeros((len(logit), len(FEATURES)))
        features[:, 0], features[:, 1], features[:, 2], features[:, 3] = (
            logit, recall, rerank_margin, recall_margin)
        views.append(decision.predict(features))
    z = (recall - recall.mean()) / recall.std() + (logit - logit.mean()) / logit.std()
    return {"decision model, both views": np.maximum(*views), "z(cosine)+z(logit)": z,
            "cosine of the same pairs": recall}


def sweep_pairs(out: Path, ids: list[str], truth: Truth, thresholds: list[float],
                kind: str, reranker: str | None) -> dict[str, list[dict[str, float]]]:
    """Clusters from a run's scored pairs at each threshold: the run's own clustering (the
    guard with its default veto), other clustering variants, and (reranked runs) other maps
    from the same pairs to an edge score, each at 15 quantiles of its own scores."""
    import pyarrow.parquet as pq

    from twinq.pipelines.dedupe import DEFAULT_VETO_PROBABILITY
    from twinq.pipelines.dedupe_clusters import cluster_pairs
    from twinq.pipelines.dedupe_metrics import labels_from_clusters

    pairs = pq.read_table(out / "pairs.parquet")
    row = {doc_id: n for n, doc_id in enumerate(ids)}
    a = np.array([row[x] for x in pairs.column("a").to_pylist()], dtype=np.int64)
    b = np.array([row[x] for x in pairs.column("b").to_pylist()], dtype=np.int64)
    s = pairs.column("score").to_numpy()
    own_veto = (lambda t: min(DEFAULT_VETO_PROBABILITY, t)) if kind == "probability" else None
    variants: list[tuple[str, np.ndarray, list[float], dict[str, Any]]] = [
        ("guard (default veto)", s, thresholds, {"veto_below": own_veto}),
        ("centre, no veto", s, thresholds, {}),
        ("centre, veto below t", s, thresholds, {"veto_below": lambda t: t}),
        ("components", s, thresholds, {"method": "components"})]
    if reranker:
        for name, other in score_maps(pairs, a, b, len(ids), reranker).items():
            cuts = sorted({round(float(q), 6) for q in np.quantile(other, np.linspace(0.1, 0.9, 15))})
            variants.append((f"{name} (centre, no veto)", other, cuts, {}))
    curves: dict[str, list[dict[str, float]]] = {}
    for name, scores, cuts, kwargs in variants:
        curve = []
        for t in cuts:
            given = {k: v(t) if callable(v) else v for k, v in kwargs.items()}
            clusters = cluster_pairs(ids, a, b, scores, t, **given)
            labels = labels_from_clusters(len(ids), [c.members for c in clusters])
            curve.append({"threshold": t, **scores_of(labels, truth)})
        curves[name] = curve
        log.info("sweep %s: best %s", name, max(curve, key=lambda r: r["pairwise_f1"]))
    return curves


def default_scores(out: Path, ids: list[str], truth: Truth) -> dict[str, float]:
    """Scores of the clusters the run wrote (its default threshold, the guard on)."""
    import pyarrow.parquet as pq

    from twinq.pipelines.dedupe_metrics import labels_from_clusters

    row = {doc_id: n for n, doc_id in enumerate(ids)}
    members = pq.read_table(out / "clusters.parquet", columns=["member_ids"]).column(0).to_pylist()
    labels = labels_from_clusters(len(ids), [[row[m] for m in c] for c in members])
    return scores_of(labels, truth)


def community_labels(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    from sentence_transformers.util import community_detection

    from twinq.pipelines.dedupe_metrics import labels_from_clusters

    start = time.perf_counter()
    found = community_detection(vectors, threshold=threshold, min_community_size=2)
    return labels_from_clusters(len(vectors), found), time.perf_counter() - start


def cd_probe(vectors_file: str, threshold: float) -> None:
    """Subprocess entry: one community_detection call, for a clean peak RSS; prints its own
    seconds and the RSS before it (imports and vectors), so that both can be subtracted."""
    import torch
    from sentence_transformers.util import community_detection  # noqa: F401 - import cost

    torch.set_num_threads(int(os.environ.get("TWINQ_THREADS", "2")))
    vectors = np.load(vectors_file)
    before = _rss_mib()
    _, seconds = community_labels(vectors, threshold)
    print(json.dumps({"rows": len(vectors), "cd_seconds": round(seconds, 2),
                      "rss_before_mib": before}))


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def fit_growth(sizes: list[int], values: list[float]) -> np.ndarray:
    """Least-squares a + b n + c n^2 (non-negative c) through the measured points."""
    n = np.asarray(sizes, dtype=np.float64)
    design = np.stack([np.ones_like(n), n, n * n], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(values, dtype=np.float64), rcond=None)
    if coef[2] < 0:
        coef = np.append(np.linalg.lstsq(design[:, :2], values, rcond=None)[0], 0.0)
    return coef


def size_at(coef: np.ndarray, value: float) -> float:
    """The n at which a + b n + c n^2 reaches `value`."""
    a, b, c = coef
    if c > 0:
        return float((-b + np.sqrt(b * b - 4 * c * (a - value))) / (2 * c))
    return float((value - a) / b) if b > 0 else float("inf")


def memory_total_mib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- the run

def run_dedupe(name: str, root: Path, out: Path, args: argparse.Namespace, ids: list[str],
               truth: Truth, reranker: str | None) -> dict[str, Any]:
    """One `twinq dedupe` subprocess: time, memory, summary, scores at its default threshold
    and across thresholds."""
    run_out = out / f"run-{name}"
    cmd = [sys.executable, "-m", "twinq.shared.cli", "dedupe", "--root", str(root),
           "--out", str(run_out), "--neighbours", str(args.neighbours),
           "--recall-floor", str(args.recall_floor)]
    if reranker:
        if args.backend != "torch":  # the onnx export is cached beside the model: work on a copy
            import shutil

            copy = out / "reranker"
            if not copy.is_dir():
                shutil.copytree(reranker, copy, ignore=shutil.ignore_patterns("checkpoint*"))
            reranker = str(copy)
        cmd += ["--reranker", reranker, "--backend", args.backend]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.beam_arg:
        cmd += ["--", *args.beam_arg]
    cost_file = run_out / "bench_cost.json"
    if args.reuse_runs and cost_file.is_file() and (run_out / "summary.json").is_file():
        log.info("%s: reusing %s", name, run_out)
        cost = json.loads(cost_file.read_text())
    else:
        log.info("%s: %s", name, " ".join(cmd))
        cost = measured(cmd, out / f"run-{name}.log")
        cost_file.write_text(json.dumps(cost))
    summary = json.loads((run_out / "summary.json").read_text())
    if reranker:
        thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
    else:
        thresholds = [round(0.70 + 0.02 * i, 2) for i in range(14)]  # cheap: pairs are stored
        thresholds = [t for t in thresholds if t >= args.recall_floor]
    thresholds = sorted(set(thresholds) | {summary["threshold"]["value"]})
    result = {"command": " ".join(cmd[2:]), **cost, "summary": summary,
              "default": {"threshold": summary["threshold"]["value"],
                          **default_scores(run_out, ids, truth)},
              "sweep": sweep_pairs(run_out, ids, truth, thresholds, summary["score"], reranker)}
    best = max(result["sweep"]["guard (default veto)"], key=lambda r: r["pairwise_f1"])
    result["best"] = best
    log.info("%s: %.0fs, %.0f MiB; default %s; best %s", name, cost["seconds"],
             cost["peak_rss_mib"], result["default"], best)
    return result


def run_community(out: Path, vectors: np.ndarray, truth: Truth, sizes: list[int],
                  thresholds: list[float]) -> dict[str, Any]:
    """community_detection: a threshold sweep in-process; time and peak RSS per corpus size in
    subprocesses at its best threshold; the size at which it would fill this machine's RAM."""
    sweep: list[dict[str, Any]] = []

    def measure(t: float) -> None:
        labels, seconds = community_labels(vectors, t)
        sweep.append({"threshold": t, "seconds": round(seconds, 2), **scores_of(labels, truth)})
        log.info("community_detection %.2f: %s", t, sweep[-1])

    for t in thresholds:
        measure(t)
    best = max(sweep, key=lambda r: r["pairwise_f1"])
    for t in (round(best["threshold"] - 0.02, 2), round(best["threshold"] + 0.02, 2)):
        if t not in {r["threshold"] for r in sweep}:
            measure(t)
    sweep.sort(key=lambda r: r["threshold"])
    best = max(sweep, key=lambda r: r["pairwise_f1"])
    probes = []
    rng = np.random.default_rng(0)
    for n in sorted(set(min(s, len(vectors)) for s in sizes)):
        path = out / f"cd-vectors-{n}.npy"
        np.save(path, vectors[np.sort(rng.choice(len(vectors), n, replace=False))])
        cmd = [sys.executable, __file__, "--cd-probe", str(path), "--cd-threshold",
               str(best["threshold"])]
        cost = measured(cmd, out / f"cd-probe-{n}.log")
        inner = json.loads([x for x in (out / f"cd-probe-{n}.log").read_text().splitlines()
                            if x.startswith("{")][-1])
        probes.append({"rows": n, "seconds": inner["cd_seconds"],
                       "peak_rss_mib": cost["peak_rss_mib"],
                       "cd_mib": round(cost["peak_rss_mib"] - inner["rss_before_mib"], 1)})
        path.unlink()
        log.info("community_detection probe: %s", probes[-1])
    total = memory_total_mib()
    memory = fit_growth([p["rows"] for p in probes], [p["peak_rss_mib"] for p in probes])
    seconds = fit_growth([p["rows"] for p in probes], [p["seconds"] for p in probes])
    oom_rows = size_at(memory, total)
    return {"sweep": sweep, "best": best, "probes": probes, "memory_total_mib": round(total),
            "memory_fit_mib": memory.tolist(), "seconds_fit": seconds.tolist(),
            "oom_rows_estimate": round(oom_rows),
            "seconds_at_oom_rows_estimate": round(float(np.polyval(seconds[::-1], oom_rows)))}


def _row(name: str, row: dict[str, float], seconds: float | str, rss: float | str) -> str:
    held = (f"{row['heldout_pairwise_f1']:.4f} | {row['heldout_bcubed_f1']:.4f}"
            if "heldout_pairwise_f1" in row else "- | -")
    return (f"| {name} | {row['threshold']:g} | {row['pairwise_precision']:.4f} | "
            f"{row['pairwise_recall']:.4f} | **{row['pairwise_f1']:.4f}** | {row['bcubed_f1']:.4f} "
            f"| {held} | {seconds} | {rss} |")


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# twinq dedupe on Quora ({report['rows']:,} questions, {report['true_clusters']:,} "
             f"true clusters, {report['true_pairs']:,} true pairs; held out from training: "
             f"{report['heldout_rows']:,} questions)", "", f"Machine: {report['machine']}", "",
             "| method | threshold | pairwise P | pairwise R | pairwise F1 | B-cubed F1 "
             "| held-out pairwise F1 | held-out B-cubed F1 | time (s) | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in report["runs"].items():
        for label, row in (("default", run["default"]), ("best", run["best"])):
            lines.append(_row(f"twinq dedupe, {name} ({label})", row, f"{run['seconds']:.0f}",
                              f"{run['peak_rss_mib']:.0f}"))
    cd = report["community_detection"]
    probe = max(cd["probes"], key=lambda p: p["rows"])
    lines.append(_row("community_detection (best)", cd["best"], f"{cd['best']['seconds']:.0f}",
                      f"{probe['peak_rss_mib']:.0f}"))
    lines += ["", "Chaining guard: pairwise F1 (precision) at each run's default threshold", ""]
    for name, run in report["runs"].items():
        t = run["default"]["threshold"]
        row = {k: next(r for r in v if r["threshold"] == t) for k, v in run["sweep"].items()
               if any(r["threshold"] == t for r in v)}
        lines.append(f"- {name}: " + ", ".join(f"{k} {v['pairwise_f1']:.4f} "
                                               f"({v['pairwise_precision']:.3f})"
                                               for k, v in row.items()))
    for name, run in report["runs"].items():
        counts, timings = run["summary"]["counts"], run["summary"]["timings_s"]
        lines.append(f"- {name}: {counts['candidate_pairs']:,} candidate pairs, "
                     f"{counts['pairs_reranked']:,} reranked; seconds: " + ", ".join(
                         f"{k} {v:.0f}" for k, v in timings.items()))
    lines += ["", "Best threshold of each variant (pairwise F1 / held-out pairwise F1 / B-cubed F1):",
              ""]
    for name, run in report["runs"].items():
        for variant, curve in run["sweep"].items():
            top = max(curve, key=lambda r: r["pairwise_f1"])
            lines.append(f"- {name}, {variant}: at {top['threshold']:g}: {top['pairwise_f1']:.4f}"
                         f" / {top.get('heldout_pairwise_f1', float('nan')):.4f} / "
                         f"{top['bcubed_f1']:.4f}")
    probes = "; ".join(f"{p['rows']:,} rows: {p['seconds']:.1f} s, {p['peak_rss_mib']:.0f} MiB"
                       for p in cd["probes"])
    lines += ["", f"community_detection at {cd['best']['threshold']:g}: {probes}. Fit a + bn + "
              f"cn^2: memory {[f'{x:.3g}' for x in cd['memory_fit_mib']]} MiB, time "
              f"{[f'{x:.3g}' for x in cd['seconds_fit']]} s; it would fill this machine's "
              f"{cd['memory_total_mib']:,} MiB at about {cd['oom_rows_estimate']:,} rows, "
              f"after about {cd['seconds_at_oom_rows_estimate']:,} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cos_ax, prob_ax = axes
    cd = report["community_detection"]["sweep"]
    cos_ax.plot([r["threshold"] for r in cd], [r["pairwise_f1"] for r in cd], "k--",
                label="community_detection")
    for name, run in runs.items():
        ax = prob_ax if run["summary"]["score"] == "probability" else cos_ax
        for variant, curve in run["sweep"].items():
            if "(centre, no veto)" in variant:
                continue  # other score scales: in report.json and report.md, not on this axis
            style = "-o" if variant.startswith("guard") else "-." if variant == "components" else ":"
            ax.plot([r["threshold"] for r in curve], [r["pairwise_f1"] for r in curve], style,
                    label=f"{name}: {variant}", markersize=3)
    cos_ax.set_xlabel("cosine threshold")
    prob_ax.set_xlabel("probability threshold (reranker)")
    for ax in axes:
        ax.set_ylabel("pairwise F1")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quora, {report['rows']} questions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "quora-snap")
    parser.add_argument("--reranker", default=None, help="Reranker with a decision model.")
    parser.add_argument("--questions", type=int, default=0, help="Sample whole true clusters up "
                        "to this many questions (0: every row of the snapshot).")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-dedupe")
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--recall-floor", type=float, default=0.8)
    parser.add_argument("--backend", default="auto", help="Cross-encoder backend (default: 'auto', as `twinq dedupe`).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beam-arg", action="append", default=[], help="Extra Beam flag.")
    parser.add_argument("--no-recall-only", action="store_true", help="Skip the recall-only run.")
    parser.add_argument("--reuse-runs", action="store_true", help="Reuse the dedupe runs already "
                        "under --out (their pairs, summary and measured cost) and the "
                        "community_detection results: sweep again only.")
    parser.add_argument("--cd-sizes", default="5000,10000,20000,40000",
                        help="Corpus sizes of the community_detection memory probes.")
    parser.add_argument("--seen", type=Path, action="append",
                        default=[REPO / "runs" / "quora-beir" / "train_pairs.tsv",
                                 REPO / "runs" / "quora-beir" / "labelled_train.tsv"],
                        help="Pair files the reranker trained on: rows with their questions are "
                        "left out of the held-out scores.")
    parser.add_argument("--cd-probe", help=argparse.SUPPRESS)
    parser.add_argument("--cd-threshold", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cd_probe:
        cd_probe(args.cd_probe, args.cd_threshold)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TWINQ_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ids, texts, vectors = load_rows(args.root)
    labels = truth_labels(texts)
    root = args.root
    if args.questions:
        keep = sample_clusters(labels, args.questions, args.seed)
        ids, texts, vectors, labels = ([ids[i] for i in keep], [texts[i] for i in keep],
                                       vectors[keep], labels[keep])
        root = args.out / "snapshot"
        if not (root / "CURRENT").is_file():
            from twinq.shared.constants import DEFAULT_MODEL

            write_subset(root, ids, texts, vectors, DEFAULT_MODEL)
    order = np.argsort(ids, kind="stable")  # rows by id, as the snapshot's names sort them
    ids, texts = [ids[i] for i in order], [texts[i] for i in order]
    vectors, labels = vectors[order], labels[order]
    from twinq.pipelines.dedupe_metrics import cluster_scores
    from twinq.pipelines.splits import question_key

    seen = seen_questions(args.seen)
    truth = Truth(labels, np.array([question_key(t) not in seen for t in texts], dtype=bool))
    report: dict[str, Any] = {
        "machine": machine(), "rows": len(ids), "true_clusters": int(len(set(labels.tolist()))),
        "true_pairs": int(cluster_scores(labels, labels)["true_pairs"]), "root": str(root),
        "heldout_rows": int(truth.heldout.sum()),
        "heldout_true_pairs": int(cluster_scores(labels[truth.heldout],
                                                 labels[truth.heldout])["true_pairs"]),
        "seen_files": [str(f) for f in args.seen if f.is_file()], "runs": {}}
    if not args.no_recall_only:
        report["runs"]["recall only"] = run_dedupe("recall", root, args.out, args, ids, truth, None)
    if args.reranker:
        report["runs"]["reranker"] = run_dedupe("reranker", root, args.out, args, ids, truth,
                                                args.reranker)
    sizes = [int(s) for s in args.cd_sizes.split(",") if s] + [len(ids)]
    cd_file = args.out / "community_detection.json"
    if args.reuse_runs and cd_file.is_file():
        report["community_detection"] = json.loads(cd_file.read_text())
    else:
        report["community_detection"] = run_community(args.out, vectors, truth, sizes,
                                                      CD_THRESHOLDS)
        cd_file.write_text(json.dumps(report["community_detection"], indent=2) + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(report_markdown(report))
    plot(report, args.out / "thresholds.png")
    print(report_markdown(report))


if __name__ == "__main__":
    main()
