"""Does an attention intervention cost more than a plain forward pass?

For each intervention of ``tokext.interventions`` at its default settings, times a forward pass
inside ``intervene`` against a plain eager forward pass over the same batches (each in its own
process: one warm-up, then the median of several runs; peak RSS of the process; interleaved), and
prints the ratios to the plain forward pass measured in the same run.

    python benchmarks/interventions.py            # SmolLM2-135M, fp32, T = 512 and 2048
    python benchmarks/interventions.py --quick    # small and fast (used by the tests)
    python benchmarks/interventions.py --device cuda --dtype bfloat16 --seq-lens 2048,8192 --baseline sdpa_forward
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_stats import real_token_batches  # noqa: E402
from harness import (
    benchmark,
    limit_memory_from_env,
    load_for_job,
    parser,
    run_worker_if_asked,
    sdpa_forward,  # noqa: E402
    seq_len_configs,
    time_method,
)

INTERVENTIONS = {
    "EarlyLayerEmulation": "EarlyLayerEmulation()",
    "EarlyLayerEmulation_uniform": "EarlyLayerEmulation(uniform=True)",
    "SinkCalibration": "SinkCalibration()",
    "SinkRebalance_first": "SinkRebalance(targets='first', scale=0.5)",
    "AttentionTemperature": "AttentionTemperature(1.5)",
    "PatternPatch": "PatternPatch(source_layer=0, target_layers=[1, 2, 3])",
    "HeadAblation": "HeadAblation(heads=[(5, 0), (10, 3)])",
}


def worker(job: dict) -> dict:
    import torch

    from tokext import interventions as ivs

    limit_memory_from_env()
    device = job.get("device", "cpu")
    method = job["method"]
    if method == "sdpa_forward":
        make = lambda m: real_token_batches(m, job["seq_len"], job["n_seqs"], job["batch_size"])  # noqa: E731
        return time_method(sdpa_forward(job, make), job["repeats"], device)
    model = load_for_job(job)
    batches = [b.to(device) for b in real_token_batches(model, job["seq_len"], job["n_seqs"], job["batch_size"])]
    applied = () if method == "plain_forward" else (eval(INTERVENTIONS[method], vars(ivs)),)  # noqa: S307

    def run():
        with torch.inference_mode(), ivs.intervene(model, *applied):
            for tokens in batches:
                model(tokens, return_type=None)

    return time_method(run, job["repeats"], device)


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    if run_worker_if_asked(args, worker):
        return 0
    if seq_len_configs(args):
        configs, rounds, repeats = seq_len_configs(args), args.rounds, args.repeats
        methods = ["plain_forward", "sdpa_forward", *INTERVENTIONS]
    elif args.quick:
        configs, rounds, repeats = [dict(seq_len=64, n_seqs=2, batch_size=2)], 1, 1
        methods = ["plain_forward", "EarlyLayerEmulation", "SinkCalibration"]
    else:
        configs = [dict(seq_len=512, n_seqs=4, batch_size=4), dict(seq_len=2048, n_seqs=1, batch_size=1)]
        methods = ["plain_forward", "sdpa_forward", *INTERVENTIONS]
        rounds, repeats = args.rounds, args.repeats
    benchmark(__file__, "interventions vs a plain forward pass", args, configs, methods, rounds, repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
