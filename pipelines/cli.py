"""`twinq index ...` and `twinq search`: build, manage and query snapshots from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from twinq.shared import snapshot as snap
from twinq.shared.config import Settings, load_settings
from twinq.shared.errors import BadInput

index_app = typer.Typer(help="Build and manage versioned snapshots.", no_args_is_help=True,
                        rich_markup_mode=None)
console = Console(markup=False, emoji=False, highlight=False)
"""Everything printed here is data (corpus text, ids, versions, manifest fields): printed
literally, so that a question containing `[/]` cannot crash the table, `[bold]` cannot vanish,
`[link=...]` cannot become a hidden hyperlink and `:smile:` stays text."""
RootOpt = typer.Option(None, "--root", help="Snapshot root: a folder, or s3://bucket/prefix, gs://... (or TWINQ_ROOT).")
ConfigOpt = typer.Option(None, "--config", help="TOML settings file (or TWINQ_CONFIG).")


def _settings(config: Optional[Path], **flags: object) -> Settings:
    """Flags over `TWINQ_*` over the TOML file over defaults: the one way settings are read."""
    settings = load_settings(config, overrides=flags)
    if not settings.root:
        raise BadInput("no snapshot root: pass --root or set TWINQ_ROOT")
    return settings


@index_app.command(
    "build", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def build_command(
    ctx: typer.Context,
    corpus: list[str] = typer.Option(..., "--corpus", help="Corpus file or glob (CSV, TSV, JSONL, Parquet); repeatable."),
    root: Optional[str] = RootOpt,
    config: Optional[Path] = ConfigOpt,
    shards: int = typer.Option(4, help="Number of shards (ids are assigned by a stable hash)."),
    model: Optional[str] = typer.Option(None, help="Bi-encoder path or hub name (or TWINQ_MODEL); default: bundled all-MiniLM-L6-v2."),
    id_field: Optional[str] = typer.Option(None, help="Id column (default: _id, id, qid or question_id)."),
    text_field: Optional[str] = typer.Option(None, help="Text column (default: text, question, query or title)."),
    publish: bool = typer.Option(False, "--publish", help="Publish (swap CURRENT) once the snapshot validates."),
    memory_budget: str = typer.Option("4G", help="Memory budget per shard index, e.g. 512M or 4G."),
    index_factory: Optional[str] = typer.Option(None, help="FAISS factory key overriding the automatic choice."),
    reuse_from: Optional[str] = typer.Option("auto", help="Root whose published vectors to reuse; 'auto' = --root, 'none' = off."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per Beam worker process (or TWINQ_THREADS)."),
    backend: Optional[str] = typer.Option(None, help="Encoder backend: auto (default: onnx int8 where its quality check passes, else onnx-fp32, else torch; recorded in the manifest), torch, onnx (int8), onnx-fp32, openvino (or TWINQ_BACKEND)."),
    batch_size: int = typer.Option(1024, help="Texts per inference batch (encode sorts each by length)."),
    canary: int = typer.Option(200, help="Rows self-queried to validate the snapshot (0 = off)."),
    pushgateway: Optional[str] = typer.Option(None, help="Push build metrics to this Prometheus Pushgateway."),
    updates: bool = typer.Option(False, "--updates", help="Fold the live update stream in (upserts and deletes up to a watermark taken before the corpus is read); needs --redis-url or TWINQ_REDIS_URL."),
    trim_updates: bool = typer.Option(False, "--trim-updates", help="With --updates and --publish: then trim the stream below the oldest watermark still served (only if the corpus export holds what is trimmed)."),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", help="Redis holding the update stream (or TWINQ_REDIS_URL)."),
    clusters: Optional[str] = typer.Option(None, "--clusters", help="clusters.parquet of `twinq dedupe` (path or store URL): store each clustered row's cluster_id and canonical_id as metadata, so that replies can collapse a cluster into one hit."),
) -> None:
    """Embed a corpus with Beam and write a new snapshot. Extra `--flags` go to Beam
    (e.g. `--direct_num_workers 2 --direct_running_mode multi_processing`, or `--runner FlinkRunner`)."""
    from twinq.pipelines.build_metrics import push_build_metrics
    from twinq.pipelines.index import BuildOptions, build_snapshot

    settings = _settings(config, root=root, model=model, threads=threads,
                         backend=backend, redis_url=redis_url)
    if trim_updates and not (updates and publish):
        raise BadInput("--trim-updates needs --updates and --publish")
    opts = BuildOptions(
        corpus=corpus, root=settings.root, shards=shards, model=settings.model, id_field=id_field,
        text_field=text_field, publish=publish, memory_budget=memory_budget,
        index_factory=index_factory, reuse_from=None if reuse_from == "none" else reuse_from,
        threads=settings.threads, backend=settings.backend, batch_size=batch_size, canary=canary, beam_args=list(ctx.args),
        updates=settings if updates else None, trim_updates=trim_updates, clusters=clusters)
    try:
        result = build_snapshot(opts)
    except Exception:
        if pushgateway:
            push_build_metrics(pushgateway, None)
        raise
    if pushgateway:
        push_build_metrics(pushgateway, result.manifest)
    _print_summary(result.manifest, result.published)


def _print_summary(manifest: dict, published: bool) -> None:
    corpus, build = manifest["corpus"], manifest["build"]["stages_s"]
    table = Table(title=f"snapshot {manifest['version']}" + (" (published)" if published else ""))
    for column in ("rows read", "rejected", "distinct texts", "embedded", "reused", "shards", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(*map(str, (corpus["rows_read"], corpus["rows_rejected"], corpus["rows_indexed"],
                             corpus["rows_embedded"], corpus["rows_reused"],
                             len(manifest["shards"]), build.get("total"))))
    console.print(table)
    if manifest.get("updates"):
        console.print(f"live updates folded in: {manifest['updates'].get('applied')} up to "
                      f"{manifest['updates']['watermark']}")
    kinds = sorted({e["faiss_factory"] for e in manifest["shards"]})
    console.print(f"index types: {', '.join(kinds)}; canary rank-1 rate "
                  f"{manifest['validation'].get('rank1_rate')}")


@index_app.command("list")
def list_command(root: Optional[str] = RootOpt, config: Optional[Path] = ConfigOpt) -> None:
    """List versions: complete or not, and which one is published."""
    root = _settings(config, root=root).root
    table = Table()
    for column in ("version", "published", "complete", "rows", "created"):
        table.add_column(column)
    for info in snap.list_versions(root):
        state = "building" if info.building else ("yes" if info.complete else "no")
        table.add_row(info.version, "*" if info.published else "", state, str(info.rows or ""),
                      info.created_at or "")
    console.print(table)


@index_app.command("publish")
def publish_command(version: str, root: Optional[str] = RootOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Publish a complete version (atomic swap of CURRENT)."""
    root = _settings(config, root=root).root
    snap.publish(root, version)
    console.print(f"published {version}")


@index_app.command("rollback")
def rollback_command(root: Optional[str] = RootOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Publish the previously published version again."""
    root = _settings(config, root=root).root
    console.print(f"rolled back to {snap.rollback(root)}")


@index_app.command("gc")
def gc_command(root: Optional[str] = RootOpt, config: Optional[Path] = ConfigOpt,
               keep: int = typer.Option(3, help="Complete versions to keep.")) -> None:
    """Delete old versions and abandoned builds; never the published one."""
    root = _settings(config, root=root).root
    removed = snap.gc(root, keep)
    console.print(f"removed {len(removed)}: {', '.join(removed) or '-'}")


def search_command(
    question: str = typer.Argument(..., help="The question to find twins for."),
    root: Optional[str] = RootOpt,
    config: Optional[Path] = ConfigOpt,
    top_k: int = typer.Option(10, help="Hits to show."),
    model: Optional[str] = typer.Option(None, help="Override the snapshot's bi-encoder."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Search the published snapshot in-process (no queue, no rerank)."""
    from twinq.shared.models import encode_normalised
    from twinq.shared.opened_snapshot import open_snapshot
    from twinq.shared.search import search_shards
    from twinq.shared.text import normalize_text

    settings = _settings(config, root=root and str(root), model=model)
    opened = open_snapshot(settings.root, model=settings.model, backend=settings.backend)
    snapshot = opened.snapshot
    vectors = encode_normalised(opened.bi_encoder, [normalize_text(question)])
    hits = search_shards(snapshot, vectors, top_k)[0]
    if json_out:
        print(json.dumps({"snapshot": snapshot.version,
                          "results": [h.to_dict(i + 1) for i, h in enumerate(hits)]}, ensure_ascii=False))
        return
    table = Table(title=f"snapshot {snapshot.version}")
    table.add_column("rank", justify="right")
    table.add_column("id")
    table.add_column("question")
    table.add_column("recall score", justify="right")
    for i, hit in enumerate(hits, start=1):
        table.add_row(str(i), hit.id, hit.text, f"{hit.recall_score:.3f}")
    console.print(table)
