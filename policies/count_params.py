"""Print a policy size's parameter count, built on the `meta` device (no weights allocated, nothing downloaded).

    python -m policies.count_params                       # openvla 7b: about 7.5B
    python -m policies.count_params --policy rt2 --size base
"""
from __future__ import annotations

import argparse

import torch


def count_parameters(policy_type: str = "openvla", size: str = "7b") -> dict[str, int]:
    """Parameters per part (vision, projector, llm, action_slots) and in total."""
    import policies

    model = policies.policy_class(policy_type).from_size(size, device="meta")
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(counts.values())
    if any(p.device != torch.device("meta") for p in model.parameters()):
        raise RuntimeError("a parameter was allocated outside the meta device")
    return counts


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="openvla", choices=("openvla", "rt2"))
    parser.add_argument("--size", default="7b", choices=("tiny", "base", "7b"))
    args = parser.parse_args(argv)
    counts = count_parameters(args.policy, args.size)
    for name, n in counts.items():
        print(f"{name:>12}: {n:>15,d}")
    print(f"{args.policy} {args.size}: {counts['total'] / 1e9:.2f}B parameters")
    return counts


if __name__ == "__main__":
    main()
