"""Forward/backward samples per second and peak memory of a policy's training step.

    python benchmarks/policy_training.py                                  # tiny OpenVLA on the CPU
    python benchmarks/policy_training.py --size base --device cuda        # bf16 autocast on a GPU
    python benchmarks/policy_training.py --lora --gradient-checkpointing

Batches have the data reader's layout (uint8 224 x 224 images, normalized actions, instructions).
Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident set
size (ru_maxrss), which includes Python and the libraries.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def make_batch(size: int, image: int, chunk: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (size, chunk, 7) if chunk > 1 else (size, 7)
    batch = {"image": torch.randint(0, 256, (size, image, image, 3), dtype=torch.uint8, generator=g),
             "instruction": ["pick up the red cube", "open the drawer"] * (size // 2) + ["press the red button"] * (size % 2),
             "action": torch.rand(shape, generator=g) * 2 - 1}
    if chunk > 1:
        batch["action_mask"] = torch.ones(size, chunk, dtype=torch.bool)
    return batch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="openvla", choices=("openvla", "rt2"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "base", "7b"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decoding", default="autoregressive", choices=("autoregressive", "parallel"))
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import policies
    from tqdm.auto import tqdm

    from action_decoding import synthetic_statistics

    torch.manual_seed(0)
    model = policies.policy_class(args.policy).from_size(
        args.size, statistics=synthetic_statistics(), decoding=args.decoding, action_chunk=args.chunk,
        gradient_checkpointing=args.gradient_checkpointing).to(args.device)
    if args.lora:
        model = policies.apply_lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = model.config.observation_image_size
    batch = make_batch(args.batch, size, args.chunk)

    def step():
        loss, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step()  # warm-up (allocations, kernels)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="steps", leave=False):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "process peak RSS"
    result = {"policy": args.policy, "size": args.size, "device": args.device, "batch": args.batch,
              "lora": args.lora, "gradient_checkpointing": args.gradient_checkpointing,
              "decoding": args.decoding, "chunk": args.chunk, "threads": torch.get_num_threads(),
              "trainable_params": sum(p.numel() for p in params),
              "total_params": sum(p.numel() for p in model.parameters()),
              "samples_per_s": args.batch * args.steps / seconds, "step_ms": 1000 * seconds / args.steps,
              "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind}
    print(f"{args.policy} {args.size} on {args.device}: batch {args.batch}, "
          f"{result['trainable_params']:,} of {result['total_params']:,} parameters trained"
          f"{' (LoRA)' if args.lora else ''}")
    print(f"  {result['samples_per_s']:.1f} samples/s ({result['step_ms']:.0f} ms/step), "
          f"peak memory {peak_mb:.0f} MiB ({peak_kind})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
