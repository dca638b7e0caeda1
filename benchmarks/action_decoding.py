"""Actions per second: parallel chunk decoding (OpenVLA-OFT) against autoregressive decoding (OpenVLA).

Both run on the same policy (same weights), in the same process, alternating rounds so that a
loaded machine slows both alike:
- autoregressive: 7 action tokens per call, one LLM step each with a KV cache → 1 action per call;
- parallel: K*7 action slots decoded in one bidirectional forward pass → K actions per call.

    python benchmarks/action_decoding.py                      # tiny OpenVLA on the CPU, K=8
    python benchmarks/action_decoding.py --size base --device cuda

Goal: >= 26x (OpenVLA-OFT's reported throughput gain, chunk 8 on LIBERO).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

GOAL = 26.0


def synthetic_statistics(dim: int = 7) -> dict:
    from embodied.data.statistics import compute_statistics

    rng = np.random.default_rng(0)
    return {"bench": compute_statistics(rng.normal(0, 0.02, (256, dim)), rng.normal(size=(256, 8)), 4)}


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="openvla", choices=("openvla", "rt2"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "base", "7b"))
    parser.add_argument("--chunk", type=int, default=8, help="K actions per parallel call")
    parser.add_argument("--batch", type=int, default=1, help="observations per call")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5, help="calls per mode per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (weights); default float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import policies
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    policy = policies.policy_class(args.policy).from_size(args.size, statistics=synthetic_statistics(),
                                                          decoding="parallel", action_chunk=args.chunk)
    policy = policy.to(args.device, getattr(torch, args.dtype) if args.dtype else None).eval()
    size = policy.config.observation_image_size
    rng = np.random.default_rng(0)
    observations = [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)} for _ in range(args.batch)]
    instructions = ["pick up the red cube"] * args.batch

    modes = {
        "autoregressive": lambda: policy.predict_actions(observations, instructions, decoding="autoregressive",
                                                         num_actions=1),
        "parallel": lambda: policy.predict_actions(observations, instructions, decoding="parallel"),
    }
    actions_per_call = {"autoregressive": args.batch, "parallel": args.batch * args.chunk}
    for fn in modes.values():  # warm-up
        fn(), fn()
    seconds = {m: 0.0 for m in modes}
    for _ in tqdm(range(args.rounds), desc="rounds", leave=False):
        for mode, fn in modes.items():
            seconds[mode] += sum(timed(fn, args.device) for _ in range(args.calls))
    calls = args.rounds * args.calls
    result = {"policy": args.policy, "size": args.size, "device": str(args.device), "batch": args.batch,
              "chunk": args.chunk, "calls_per_mode": calls, "threads": torch.get_num_threads()}
    for mode in modes:
        result[f"{mode}_ms_per_call"] = 1000 * seconds[mode] / calls
        result[f"{mode}_actions_per_s"] = actions_per_call[mode] * calls / seconds[mode]
    result["ratio"] = result["parallel_actions_per_s"] / result["autoregressive_actions_per_s"]
    print(f"{args.policy} {args.size} on {args.device}, batch {args.batch}, chunk {args.chunk}, {calls} calls per mode")
    for mode in modes:
        print(f"  {mode:>15}: {result[f'{mode}_ms_per_call']:8.2f} ms/call  "
              f"{result[f'{mode}_actions_per_s']:9.1f} actions/s")
    print(f"  parallel / autoregressive = {result['ratio']:.1f}x (goal >= {GOAL:.0f}x: "
          f"{'met' if result['ratio'] >= GOAL else 'not met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
