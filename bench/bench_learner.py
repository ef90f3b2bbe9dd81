"""Learner throughput on replayed trajectories: samples/s, tokens/s, GFLOP/s vs the fp32 matmul roofline.

One GRPO step is timed exactly as the Learner actor runs it: `LearnerCore.train`
on a list of scored batches. The batches are real sampler trajectories
(`dgrpo.models.sampler.sample`, unconditional windows, from a randomly
initialised model: speed does not depend on the weights) with random rewards,
so every group carries signal and nothing is skipped.

FLOPs (matmul only, `forward_flops_per_token`) per replayed row of T tokens:
1 reference forward + 3 (policy forward + backward) per epoch, + 1 forward when
`old_logprob=recompute`. A row is one (sample, denoising step) pair that
revealed tokens; `replay_steps=K` replays K random steps per sample instead of
all S (exact per-token log-probs, estimated loss).

`--reference-on learner,rollout` compares the learner with and without its reference pass
(grpo.reference_on=rollout: the batches carry the reference's terms, computed beforehand as a rollout worker
does, trajectory.reference_terms); each rep also times what that costs a worker next to its sampling of the
same batch (`worker_*` fields: sample() and reference_terms() on the same trajectories, one thread).

All configurations are measured round-robin (rep 1 of every config, then rep
2, ...) so the ratios between them survive the noise of a shared machine; the
figures are medians over reps.

    python -m bench.bench_learner [--presets tiny,small] [--steps 16,32] [--replay all,4]
        [--rows-per-chunk 32,256] [--old-logprob behaviour] [--reference-on learner] [--threads 1] [--reps 2]
        [--quick] [--out ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch

from bench.common import (VOCAB, default_out, ints, machine_info, median, names, pct, print_table,
                          roofline_gflops, write_json)
from dgrpo.config import GRPOConfig
from dgrpo.learner.core import LearnerCore
from dgrpo.models.diffusion import DiffusionLM
from dgrpo.models.sampler import DEFAULTS, RevealRule, sample
from dgrpo.models.trajectory import reference_terms
from dgrpo.models.transformer import count_params, forward_flops_per_token, preset_config
from dgrpo.protocols import RolloutBatch, ScoredBatch


def make_scored_batch(model: DiffusionLM, n_prompts: int, group_size: int, steps: int, seed: int = 0,
                      request_id: int = 0, order: str = DEFAULTS.order) -> ScoredBatch:
    """A real sampler trajectory batch (G prompts x k samples, unconditional) with random rewards."""
    T = model.cfg.block_size
    g = torch.Generator().manual_seed(seed)
    prompts = torch.full((n_prompts * group_size, T), model.mask_id, dtype=torch.long)
    with torch.no_grad():
        out = sample(model.eval(), prompts, steps=steps, order=order, temperature=1.0, generator=g)  # as recorded below
    batch = RolloutBatch(request_id=request_id, tokens=out.tokens, reveal_step=out.reveal_step,
                         logprobs=out.logprobs,
                         group_index=torch.arange(n_prompts).repeat_interleave(group_size),
                         policy_version=0, worker_id=0, steps=steps, temperature=1.0, top_k=0, top_p=1.0,
                         order=order, random_reveal=DEFAULTS.random_reveal, selection=out.selection)
    rewards = torch.rand(n_prompts * group_size, generator=g)
    return ScoredBatch(rollout=batch, rewards=rewards, judge_id=0)


def with_reference_terms(scored: ScoredBatch, reference: DiffusionLM, replay_steps: int | None,
                         seed: int) -> tuple[ScoredBatch, float]:
    """The batch as a worker under grpo.reference_on=rollout sends it, and the seconds the terms took."""
    r = scored.rollout
    t0 = time.perf_counter()
    mask, logprobs, selection = reference_terms(
        reference.eval(), r.tokens, r.reveal_step, r.steps, replay_steps, seed, rule=RevealRule.of(vars(r)),
        reveal_rank=r.reveal_rank, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
    seconds = time.perf_counter() - t0
    rollout = dataclasses.replace(r, replay_mask=mask, reference_logprobs=logprobs, reference_selection=selection)
    return dataclasses.replace(scored, rollout=rollout), seconds


def passes_per_row(epochs: int, old_logprob: str, reference_on: str = "learner", one_minibatch: bool = False) -> int:
    """Forward-equivalents per replayed row: reference fwd (on the learner), (fwd + 2x bwd) per epoch,
    recompute fwd (none with one update a step: the update's forward gives pi_old)."""
    recompute = old_logprob == "recompute" and not (epochs == 1 and one_minibatch)
    return (reference_on == "learner") + 3 * epochs + recompute


def _replay_label(v) -> str:
    return "all" if v is None else str(v)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small", help="comma list of tiny, small, base")
    ap.add_argument("--steps", default="16,32", help="comma list of sampler steps S")
    ap.add_argument("--replay", default="all,4", help="comma list of replay_steps: 'all' (None, exact) or K")
    ap.add_argument("--rows-per-chunk", default="32,256", help="comma list of replay_rows_per_chunk")
    ap.add_argument("--old-logprob", default="behaviour", help="comma list of behaviour, recompute")
    ap.add_argument("--reference-on", default="learner",
                    help="comma list of learner, rollout (grpo.reference_on: rollout brings the reference's terms "
                         "with the batches)")
    ap.add_argument("--order", default=DEFAULTS.order, choices=["random", "confidence"],
                    help="reveal order of the trajectories (confidence: the replay adds the selection terms)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts (groups) per GRPO step")
    ap.add_argument("--group-size", type=int, default=4, help="samples per prompt (k)")
    ap.add_argument("--minibatch-size", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--epochs", type=int, default=1, help="inner epochs (mu)")
    ap.add_argument("--threads", default="1", help="comma list of torch thread counts (actors use 1)")
    ap.add_argument("--reps", type=int, default=2, help="timed train() calls per configuration (round-robin)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, small batch, 1 rep: a few seconds")
    ap.add_argument("--out", default=str(default_out("learner")), help="JSON output file")
    args = ap.parse_args(argv)

    presets, steps_list = names(args.presets), ints(args.steps)
    replays = [None if v.lower() in ("all", "none") else int(v) for v in names(args.replay)]
    chunks, olds, thread_list = ints(args.rows_per_chunk), names(args.old_logprob), ints(args.threads)
    sides = names(args.reference_on)
    n_prompts, k, reps = args.prompts, args.group_size, args.reps
    if args.quick:
        presets, steps_list, replays, n_prompts, k, reps = ["tiny"], [4, 8], [None, 2], 2, 4, 1
        chunks, thread_list = chunks[-1:], thread_list[:1]

    old_threads = torch.get_num_threads()
    torch.set_num_threads(thread_list[0])
    info = machine_info(thread_list[0])
    roofline = {t: None for t in thread_list}
    for t in thread_list:
        roofline[t], roofline_n = roofline_gflops(args.quick, threads=t)
    torch.set_num_threads(thread_list[0])

    # data: one trajectory batch per (preset, steps), shared by every learner configuration
    models, data = {}, {}
    for preset in presets:
        torch.manual_seed(0)
        models[preset] = DiffusionLM(preset_config(preset, VOCAB))
        for S in steps_list:
            t0 = time.perf_counter()
            data[preset, S] = make_scored_batch(models[preset], n_prompts, k, S, seed=S, order=args.order)
            print(f"  sampled {n_prompts}x{k} trajectories, {preset} S={S}: {time.perf_counter() - t0:.1f} s",
                  flush=True)

    # the same batches as a worker sends them under grpo.reference_on=rollout (the reference: the start weights)
    with_terms = {}
    if "rollout" in sides:
        for (preset, S), scored in data.items():
            for replay in replays:
                with_terms[preset, S, replay] = with_reference_terms(scored, models[preset], replay, seed=S)[0]

    configs = []
    for preset, S, replay, chunk, old, side, threads in itertools.product(presets, steps_list, replays, chunks, olds,
                                                                          sides, thread_list):
        cfg = GRPOConfig(group_size=k, prompts_per_step=n_prompts, minibatch_size=args.minibatch_size,
                         epochs=args.epochs, replay_steps=replay, replay_rows_per_chunk=chunk, old_logprob=old,
                         reference_on=side, lr=1e-5)
        torch.manual_seed(0)
        policy = DiffusionLM(models[preset].cfg)
        policy.load_state_dict(models[preset].state_dict())
        configs.append({"preset": preset, "steps": S, "replay_steps": replay, "rows_per_chunk": chunk,
                        "old_logprob": old, "reference_on": side, "threads": threads,
                        "learner": LearnerCore(policy, cfg, seed=0), "walls": [], "metrics": []})

    # a worker's cost per rep: sample() of each batch and, per replay setting, the reference's terms on it
    worker = {key: {"sample_s": [], "reference_s": []} for key in with_terms}

    def time_worker(preset: str, S: int) -> None:
        torch.set_num_threads(thread_list[0])
        t0 = time.perf_counter()
        make_scored_batch(models[preset], n_prompts, k, S, seed=S, order=args.order)
        sample_s = time.perf_counter() - t0
        for replay in replays:
            worker[preset, S, replay]["sample_s"].append(sample_s)
            worker[preset, S, replay]["reference_s"].append(
                with_reference_terms(data[preset, S], models[preset], replay, seed=S)[1])

    def run(c, record: bool) -> None:
        torch.set_num_threads(c["threads"])
        batch = (with_terms[c["preset"], c["steps"], c["replay_steps"]] if c["reference_on"] == "rollout"
                 else data[c["preset"], c["steps"]])
        t0 = time.perf_counter()
        m = c["learner"].train([batch])
        wall = time.perf_counter() - t0
        if record:
            c["walls"].append(wall)
            c["metrics"].append(m)

    for preset in presets:  # warm-up per preset (allocator, kernels) on a 2-sample batch of the first S
        S = steps_list[0]
        small = make_scored_batch(models[preset], 1, 2, S, seed=1, order=args.order)
        warm = LearnerCore(DiffusionLM(models[preset].cfg), GRPOConfig(group_size=2, prompts_per_step=1), seed=0)
        warm.train([small])
    for rep in range(reps):
        for c in configs:
            run(c, record=True)
        if with_terms:
            for preset, S in data:
                time_worker(preset, S)
        print(f"  rep {rep + 1}/{reps} done", flush=True)
    torch.set_num_threads(old_threads)

    rows = []
    for c in configs:
        model = models[c["preset"]]
        T = model.cfg.block_size
        wall = median(c["walls"])
        m = c["metrics"][-1]
        replay_rows = m["replay_rows"]
        n_samples = m["num_samples"]
        passes = passes_per_row(args.epochs, c["old_logprob"], c["reference_on"],
                                one_minibatch=n_samples <= args.minibatch_size)
        flops = forward_flops_per_token(model.cfg, T, model.n_chars) * replay_rows * T * passes
        ref_s = median(x["ref_replay_s"] for x in c["metrics"])
        learn_s = median(x["learn_s"] for x in c["metrics"])
        rows.append({
            "preset": c["preset"], "params": count_params(model), "block_size": T, "steps": c["steps"],
            "replay_steps": c["replay_steps"], "replay": _replay_label(c["replay_steps"]),
            "rows_per_chunk": c["rows_per_chunk"], "old_logprob": c["old_logprob"],
            "reference_on": c["reference_on"], "threads": c["threads"],
            "samples": int(n_samples), "replay_rows": int(replay_rows), "rows_per_sample": replay_rows / n_samples,
            "tokens_trained": int(m["tokens_trained"]), "optimizer_steps": int(m["optimizer_steps"]),
            "passes_per_row": passes, "reps": len(c["walls"]), "seconds": wall, "seconds_min": min(c["walls"]),
            "seconds_all": c["walls"],
            "samples_per_s": n_samples / wall,
            "replay_tokens_per_s": replay_rows * T / wall,
            "trained_tokens_per_s": m["tokens_trained"] / wall,
            "gflop_per_step": flops / 1e9, "gflops": flops / wall / 1e9,
            "roofline_gflops": roofline[c["threads"]],
            "roofline_fraction": flops / wall / 1e9 / roofline[c["threads"]],
            "ref_share": ref_s / learn_s,
        })

    workers = []
    for (preset, S, replay), w in worker.items():
        sample_s, reference_s = median(w["sample_s"]), median(w["reference_s"])
        workers.append({"preset": preset, "steps": S, "replay": _replay_label(replay), "samples": n_prompts * k,
                        "reps": len(w["sample_s"]), "sample_s_per_sample": sample_s / (n_prompts * k),
                        "reference_s_per_sample": reference_s / (n_prompts * k),
                        "added_fraction": reference_s / sample_s, "sample_s_all": w["sample_s"],
                        "reference_s_all": w["reference_s"]})

    # ratios between interleaved configurations: replay_steps=K vs all, per (preset, S, chunk, old, threads)
    ratios = []

    def ratio(r: dict, base: dict, compare: str, row_ratio: float = 1.0) -> dict:
        return {"preset": r["preset"], "steps": r["steps"], "rows_per_chunk": r["rows_per_chunk"],
                "old_logprob": r["old_logprob"], "threads": r["threads"], "compare": compare,
                "speedup": base["seconds"] / r["seconds"], "row_ratio": row_ratio,
                "gflops_ratio": r["gflops"] / base["gflops"]}

    # the reference's pass on the workers vs on the learner, same everything else
    rkey = lambda r: (r["preset"], r["steps"], r["replay"], r["rows_per_chunk"], r["old_logprob"], r["threads"])  # noqa: E731
    for r in rows:
        base = next((b for b in rows if b["reference_on"] == "learner" and rkey(b) == rkey(r)), None)
        if r["reference_on"] == "rollout" and base is not None:
            ratios.append(ratio(r, base, f"replay {r['replay']}: reference on rollout vs learner"))
    key = lambda r: (r["preset"], r["steps"], r["rows_per_chunk"], r["old_logprob"], r["reference_on"],  # noqa: E731
                     r["threads"])
    for r in rows:
        if r["replay_steps"] is None:
            continue
        base = next((b for b in rows if b["replay_steps"] is None and key(b) == key(r)), None)
        if base is not None:
            ratios.append(ratio(r, base, f"replay {r['replay']} vs all", base["replay_rows"] / r["replay_rows"]))

    # rows_per_chunk c vs the largest chunk, same everything else
    ckey = lambda r: (r["preset"], r["steps"], r["replay"], r["old_logprob"], r["reference_on"], r["threads"])  # noqa: E731
    for r in rows:
        big = max((b for b in rows if ckey(b) == ckey(r)), key=lambda b: b["rows_per_chunk"])
        if big is not r:
            ratios.append(ratio(r, big, f"replay {r['replay']}: chunk {r['rows_per_chunk']} vs {big['rows_per_chunk']}"))
    # threads t vs the fewest threads
    tkey = lambda r: (r["preset"], r["steps"], r["replay"], r["rows_per_chunk"], r["old_logprob"],  # noqa: E731
                      r["reference_on"])
    for r in rows:
        few = min((b for b in rows if tkey(b) == tkey(r)), key=lambda b: b["threads"])
        if few is not r:
            ratios.append(ratio(r, few, f"replay {r['replay']}: {r['threads']} vs {few['threads']} threads"))

    report = {"bench": "learner", "threads": thread_list[0], "thread_counts": thread_list, "machine": info,
              "precision": "fp32", "roofline_gflops": roofline[thread_list[0]],
              "roofline_gflops_by_threads": {str(t): v for t, v in roofline.items()}, "roofline_n": roofline_n,
              "batch": {"prompts": n_prompts, "group_size": k, "minibatch_size": args.minibatch_size,
                        "epochs": args.epochs, "order": args.order},
              "flops_note": "matmul FLOPs only: forward_flops_per_token x T per replayed row x "
                            "(1 reference unless reference_on=rollout + 3 per epoch + 1 if recompute)",
              "results": rows, "ratios": ratios, "workers": workers}

    print(f"\nlearner throughput (LearnerCore.train, fp32), batch {n_prompts}x{k} samples, minibatch "
          f"{args.minibatch_size}, {args.epochs} epoch(s), {info['cpu']}; fp32 matmul roofline "
          + ", ".join(f"{v:.0f} GFLOP/s at {t} thread(s)" for t, v in roofline.items()) + f" (n={roofline_n})")
    print_table(rows, [
        ("preset", "preset"), ("steps", "S"), ("replay", "replay"), ("rows_per_chunk", "chunk"),
        ("old_logprob", "old_lp"), ("reference_on", "ref on"), ("threads", "thr"), ("replay_rows", "rows"),
        ("seconds", "s/step", ".2f"),
        ("samples_per_s", "samples/s", ".1f"), ("replay_tokens_per_s", "replay tok/s", ".0f"),
        ("trained_tokens_per_s", "trained tok/s", ".0f"), ("gflops", "GFLOP/s", ".1f"),
        ("roofline_fraction", "roofline", pct), ("ref_share", "ref share", pct)])
    if ratios:
        print()
        print_table(ratios, [("preset", "preset"), ("steps", "S"), ("rows_per_chunk", "chunk"),
                             ("threads", "thr"), ("compare", "compare"), ("speedup", "speedup", ".2f"),
                             ("row_ratio", "row ratio", ".2f"), ("gflops_ratio", "GFLOP/s ratio", ".2f")])
    if workers:
        print("\na rollout worker's reference terms next to its sampling of the same batch (grpo.reference_on=rollout)")
        print_table(workers, [("preset", "preset"), ("steps", "S"), ("replay", "replay"),
                              ("sample_s_per_sample", "sample s/sample", ".4f"),
                              ("reference_s_per_sample", "reference s/sample", ".4f"),
                              ("added_fraction", "added", pct)])
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
