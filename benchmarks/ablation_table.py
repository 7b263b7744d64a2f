"""Print the reranker ablation table (docs/results.md) from the runs benchmarks/ablate_reranker.sh left.

    .venv/bin/python benchmarks/ablation_table.py runs/ablation

Per row: what changed, training examples (pairs scored, for the listwise loss) and examples/s,
dev (question-disjoint split, mined negatives) accuracy/AP, held-out human-labelled pair
accuracy/AP, and Quora BEIR nDCG@10/MRR@10 for rerank-only and fused (recall-only is the same
for every row, printed once), with queries/s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(root: str) -> None:
    rows = sorted(p for p in Path(root).iterdir() if (p / "training.json").is_file())
    order = ["base", "labelled", "lr5e-5", "bands1-5", "len32", "no-margin", "final",
             "final-grouped", "all", "all-neg2", "all-neg2-ep2", "listwise", "all-grouped",
             "all-margin0.1", "all-denoised"]
    rows.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    print("| row | change | train examples | ex/s | dev acc | dev AP | held-out acc | held-out AP "
          "| rerank nDCG@10 | rerank MRR@10 | fused w | fused nDCG@10 | fused MRR@10 | fused q/s |")
    print("|---" * 14 + "|")
    recall, gain_lines = None, []
    for row in rows:
        meta = _load(row / "training.json")
        pairs = _load(row / "pairs" / "report.json")
        ret = _load(row / "retrieval" / "report.json")
        s, d, t = meta["settings"], meta["dev_metrics"], meta["settings"]["timings_s"]
        change = {"base": "2k Quora positives + 1 mined negative each (bands 1-5/6-20/21-50, "
                          "margin 0.05), swap, 1 epoch, lr 2e-5, max_length 64",
                  "labelled": "+ human-labelled train half (labelled_train.tsv)",
                  "lr5e-5": "lr 5e-5", "bands1-5": "negatives from ranks 1-5 only",
                  "len32": "max_length 32",
                  "no-margin": "no false-negative margin (the anchor's cluster still excluded)",
                  }.get(row.name, _describe(s))
        examples = meta["data"]["train_pairs"] * (2 if s["swap"] else 1)
        if s.get("loss") == "listwise":  # pairs scored: each group is 1 + negatives of them
            examples = round(t["examples_per_s"] * t["train"])
        cells = [row.name, change, str(examples), f"{t.get('examples_per_s', 0):.0f}",
                 f"{100 * d['accuracy']:.2f}", f"{100 * d['ap']:.2f}",
                 f"{100 * pairs['accuracy']:.2f}" if pairs else "-",
                 f"{100 * pairs['ap']:.2f}" if pairs else "-"]
        v = ret.get("variants", {})
        if v:
            recall = v["recall"]
            cells += [f"{100 * v['rerank']['ndcg@10']:.2f}", f"{100 * v['rerank']['mrr@10']:.2f}",
                      f"{ret['fusion']['weight']:g}", f"{100 * v['fused']['ndcg@10']:.2f}",
                      f"{100 * v['fused']['mrr@10']:.2f}", f"{v['fused']['qps']:.1f}"]
        else:
            cells += ["-"] * 6
        print("| " + " | ".join(cells) + " |")
        gains = ret.get("gain_vs_recall", {}).get("fused")  # reports since the paired intervals
        if gains:
            gain_lines.append(f"\n{row.name}, fused over recall (paired, 95% CI): " + "; ".join(
                f"{m} {100 * g['gain']:+.2f} ({100 * g['ci95_low']:+.2f} to "
                f"{100 * g['ci95_high']:+.2f})" for m, g in gains.items()))
    for line in gain_lines:
        print(line)
    sym = _load(Path(root) / "base" / "pairs-symmetric" / "report.json")
    if sym:
        print(f"\nbase, symmetric scoring (both orders averaged): held-out acc "
              f"{100 * sym['accuracy']:.2f}, AP {100 * sym['ap']:.2f}, "
              f"{sym['pairs_per_s']:.0f} pair scorings/s")
    for row in rows:  # symmetric scoring at inference, where it was measured on retrieval
        ret = _load(row / "retrieval-symmetric" / "report.json")
        if ret:
            v, g = ret["variants"], ret["gain_vs_recall"]["fused"]
            print(f"{row.name}, symmetric scoring in retrieval: rerank only nDCG@10 "
                  f"{100 * v['rerank']['ndcg@10']:.2f} / MRR@10 {100 * v['rerank']['mrr@10']:.2f}; "
                  f"fused (w {ret['fusion']['weight']:g}) {100 * v['fused']['ndcg@10']:.2f} / "
                  f"{100 * v['fused']['mrr@10']:.2f} = {100 * g['ndcg@10']['gain']:+.2f} / "
                  f"{100 * g['mrr@10']['gain']:+.2f} over recall, {v['fused']['qps']:.1f} q/s")
    if recall:
        print(f"recall only (bi-encoder, every row): nDCG@10 {100 * recall['ndcg@10']:.2f}, "
              f"MRR@10 {100 * recall['mrr@10']:.2f}, {recall['qps']:.1f} q/s")


def _describe(s: dict) -> str:
    batches = "length-grouped" if s.get("group_by_length") else "random"
    loss = "listwise: softmax over twin + " if s.get("loss") == "listwise" else ""
    vetted = (f", mined negatives vetted by {Path(s['denoise_with']).name} (p > "
              f"{s['denoise_threshold']:g} dropped)" if s.get("denoise_with") else "")
    return (f"{loss}{s.get('max_pairs')} positives + {s.get('negatives')} mined negative(s) each + "
            f"labelled, lr {s['lr']:g}, bands {s.get('bands')}, margin {s.get('margin', 0.05):g}, "
            f"max_length {s['max_length']}, "
            f"{s['epochs']:g} epoch, {batches} batches{vetted}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/ablation")
