"""Held-out masked-token cross-entropy of generator checkpoints, with its standard error.

The figure `dgrpo pretrain` logs is one estimate on one set of validation windows
and one draw of masks. This script repeats it on `--sets` window sets (different
windows and mask seeds) and reports the mean and its standard error, so two
checkpoints can be compared without mistaking estimator noise for progress; every
checkpoint after the first also gets its paired difference to the first (same windows
and masks in each set: mean, smallest and largest over the sets).
With `--compare-iid` it also reports the spread of the i.i.d.-t estimator that
stratified t replaced; with `--train-split` the same estimate on training windows, and
the generalisation gap (held-out minus training CE).

    python bench/eval_generator.py runs/small_gen [more checkpoints] [--windows 1024] [--sets 4]
        [--compare-iid] [--train-split] [--corpus PATH] [--threads N] [--quick] [--out bench/results/eval_generator.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import corpus_path, default_out, machine_info, print_table, write_json
from dgrpo.corpus import fixed_windows, load_corpus
from dgrpo.models.checkpoint import save_checkpoint
from dgrpo.models.diffusion import DiffusionLM, load_generator
from dgrpo.models.transformer import preset_config
from dgrpo.training.pretrain import evaluate_masked_ce


def estimates(model: DiffusionLM, val: torch.Tensor, windows: int, sets: int, batch: int, stratified: bool
              ) -> list[float]:
    return [evaluate_masked_ce(model, fixed_windows(val, windows, model.cfg.block_size, seed=s), batch,
                               seed=s, stratified=stratified) for s in range(sets)]


def summary(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "sd": sd, "se": sd / len(values) ** 0.5, "values": values}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="*", help="generator checkpoint directories")
    ap.add_argument("--corpus", default=None, help="corpus file (default: ../shared tiny Shakespeare)")
    ap.add_argument("--windows", type=int, default=1024, help="validation windows per set")
    ap.add_argument("--sets", type=int, default=4, help="window sets (independent estimates)")
    ap.add_argument("--batch", type=int, default=64, help="windows per forward (each batch's t is stratified)")
    ap.add_argument("--compare-iid", action="store_true", help="also the i.i.d.-t estimator's spread")
    ap.add_argument("--train-split", action="store_true", help="also the CE on training windows, and the gap")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a random tiny checkpoint on a synthetic corpus")
    ap.add_argument("--out", default=str(default_out("eval_generator")))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="eval_generator_")
    corpus_file = corpus_path(args.corpus, args.quick, tmp.name)
    if args.quick:
        tok = load_corpus(corpus_file).tokenizer
        torch.manual_seed(0)
        model = DiffusionLM(preset_config("tiny", tok.vocab_size))
        save_checkpoint(Path(tmp.name) / "gen", kind="generator", model_config=model.cfg, vocab=tok.to_dict(),
                        weights=model)
        args.checkpoints, args.windows, args.sets, args.batch = [str(Path(tmp.name) / "gen")], 64, 3, 16
    if not args.checkpoints:
        ap.error("name at least one generator checkpoint (or --quick)")
    rows = []
    for path in args.checkpoints:
        model, tok, ckpt = load_generator(path)
        corpus = load_corpus(corpus_file, tokenizer=tok)
        val = corpus.val
        row = {"checkpoint": str(path), "iter": ckpt.state.get("iter"), "logged_val_loss": ckpt.state.get("val_loss"),
               "stratified": summary(estimates(model, val, args.windows, args.sets, args.batch, True))}
        if args.compare_iid:
            row["iid"] = summary(estimates(model, val, args.windows, args.sets, args.batch, False))
        if args.train_split:
            row["train"] = summary(estimates(model, corpus.train, args.windows, args.sets, args.batch, True))
            row["gap"] = row["stratified"]["mean"] - row["train"]["mean"]
        if rows:  # every set uses the same windows and mask seeds for every checkpoint: a paired difference
            diffs = [a - b for a, b in zip(row["stratified"]["values"], rows[0]["stratified"]["values"])]
            row["paired_vs_first"] = {"mean": statistics.fmean(diffs), "min": min(diffs), "max": max(diffs)}
        rows.append(row)
    table = [{"checkpoint": r["checkpoint"], "iter": r["iter"], "ce": r["stratified"]["mean"],
              "se": r["stratified"]["se"], "sd_set": r["stratified"]["sd"],
              "vs_first": r.get("paired_vs_first", {}).get("mean"), "vs_min": r.get("paired_vs_first", {}).get("min"),
              "vs_max": r.get("paired_vs_first", {}).get("max"),
              "ce_iid": r.get("iid", {}).get("mean"), "sd_iid": r.get("iid", {}).get("sd"),
              "ce_train": r.get("train", {}).get("mean"), "gap": r.get("gap")} for r in rows]
    print_table(table, [("checkpoint", "checkpoint"), ("iter", "iter"), ("ce", "CE nats", ".4f"),
                        ("se", "s.e.", ".4f"), ("sd_set", "sd/set", ".4f"), ("vs_first", "vs first", "+.4f"),
                        ("vs_min", "min", "+.4f"), ("vs_max", "max", "+.4f"), ("ce_iid", "CE iid", ".4f"),
                        ("sd_iid", "sd/set iid", ".4f"), ("ce_train", "CE train", ".4f"), ("gap", "gap", ".4f")],
                title=f"held-out masked-token CE, {args.sets} sets x {args.windows} validation windows")
    report = {"bench": "eval_generator", "machine": machine_info(), "windows": args.windows, "sets": args.sets,
              "batch": args.batch, "corpus": corpus_file, "results": rows}
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
