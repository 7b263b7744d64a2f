"""Benchmark: cross-encoder training with random batches against length-grouped ones, same run.

    .venv/bin/python benchmarks/bench_train.py --rows 6400 --steps 40 --threads 2

Both arms train the same rows (real Quora pairs in both orders, as swap augmentation gives) from
the same start for the same number of steps; only the batch sampler differs. Printed: the share of
each batch's tokens that is padding (exact, from the tokenizer: it does not depend on the machine)
and training examples per second with the ratio (interleaved arms, best of `--repeats`).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from common import machine, quora_pairs
from datasets import Dataset


def padding_share(batches: list[list[int]], tokens: list[int]) -> float:
    """Padding tokens over all tokens when each batch is padded to its longest row."""
    padded = sum(len(b) * max(tokens[i] for i in b) for b in batches)
    return 1.0 - sum(tokens[i] for b in batches for i in b) / padded


def train_steps(data: Dataset, sampler: object, steps: int, batch_size: int,
                max_length: int) -> float:
    """Seconds for `steps` optimizer steps from a fresh bundled-MiniLM cross-encoder."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder import (CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    from twinq.shared.models import resolve_model

    set_seed(0)
    model = CrossEncoder(resolve_model(None)[0], num_labels=1, max_length=max_length, device="cpu")
    args = CrossEncoderTrainingArguments(
        output_dir="/tmp/twinq-bench-train", max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=5e-5, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
        **({"batch_sampler": sampler} if sampler is not None else {}))
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data,
                                  loss=BinaryCrossEntropyLoss(model))
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=6400, help="Training rows (pairs x 2 orders).")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from twinq.pipelines.batching import LengthGroupedBatchSampler, grouped_batches, pair_lengths
    from twinq.shared.models import resolve_model

    pairs = quora_pairs(args.rows // 2)
    rows = [(a, b, 1.0) for a, b in pairs] + [(b, a, 1.0) for a, b in pairs]  # labels: no speed effect
    random.Random(0).shuffle(rows)

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None)[0])
    encoded = tokenizer([r[0] for r in rows], [r[1] for r in rows], truncation=True,
                        max_length=args.max_length)
    tokens = [len(ids) for ids in encoded["input_ids"]]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    data = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                              "label": [r[2] for r in rows]})
    grouped = grouped_batches(pair_lengths(data), args.batch_size, torch.Generator().manual_seed(0))

    seconds: dict[str, list[float]] = {"random": [], "grouped": []}
    for _ in range(args.repeats):
        seconds["random"].append(train_steps(data, None, args.steps, args.batch_size, args.max_length))
        seconds["grouped"].append(train_steps(data, LengthGroupedBatchSampler, args.steps,
                                              args.batch_size, args.max_length))
    rate = {k: args.steps * args.batch_size / min(v) for k, v in seconds.items()}
    result = {
        "machine": machine(), "rows": len(rows), "steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length,
        "padding_share": {"random": round(padding_share(random_batches, tokens), 3),
                          "grouped": round(padding_share(grouped, tokens), 3)},
        "examples_per_s": {k: round(v, 1) for k, v in rate.items()},
        "speedup": round(rate["grouped"] / rate["random"], 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
