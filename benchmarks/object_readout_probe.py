"""Is where the objects are enough to act? An MLP from a policy's object readout to the recorded actions.

    python benchmarks/object_readout_probe.py --policy RUN/final --train DATA/embodied_tabletop10_mujoco \
        --heldout HELDOUT/embodied_tabletop10_mujoco

For a policy with object tokens (`policy.object_slots`), the frozen readout locates every object slot
on each recorded frame. A small MLP is then fit twice on the training episodes, predicting the
recorded translation (x, y, z) from (a) the robot state and the instruction (task and colour words)
alone, and (b) those plus the located positions (absolute and relative to the tool centre point).
The Pearson r of each on held-out episodes says whether the located positions carry what the actions
need, independently of how well the policy's LLM learnt to use them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy_image_use import pearson, task_of, template_patterns  # noqa: E402


def frames(policy, data: str, stride: int) -> dict[str, np.ndarray]:
    import torch

    from embodied.data import RLDSSource
    from embodied.vision_pretraining import CENTRE, SCALE
    from envs.tasks import COLORS, TASKS

    patterns, tasks, colours = template_patterns(), list(TASKS), list(COLORS)
    images, states, actions, task_ids, words = [], [], [], [], []
    for episode in RLDSSource(data, None, split="train[:100%]").episodes():
        instruction = episode["instruction"][0]
        named = np.zeros(2 * len(colours), dtype=np.float32)  # the first and second colour words
        for i, word in enumerate([w for w in instruction.split() if w in colours][:2]):
            named[i * len(colours) + colours.index(word)] = 1
        for t in range(0, len(episode["action"]), stride):
            images.append(episode["image"][t])
            states.append(episode["state"][t])
            actions.append(episode["action"][t][:3])
            task_ids.append(tasks.index(task_of(instruction, patterns)))
            words.append(named)
    images = np.stack(images)
    located = []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            located.append(policy.locate_objects(images[i:i + 128]).numpy())
    located = np.concatenate(located)
    states = np.stack(states)
    relative = located - ((states[:, :3] - CENTRE) / SCALE)[:, None]
    return {"located": located.reshape(len(images), -1), "relative": relative.reshape(len(images), -1),
            "state": states, "action": np.stack(actions), "task": np.eye(len(tasks))[task_ids],
            "task_id": np.array(task_ids), "words": np.stack(words), "task_names": np.array(tasks)}


def fit_and_score(train: dict, heldout: dict, keys: list[str], steps: int, seed: int) -> dict[str, list[float]]:
    import torch
    from torch import nn

    def inputs(d):
        return np.concatenate([d[k] for k in keys], axis=1).astype(np.float32)

    x_train, x_heldout = inputs(train), inputs(heldout)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    y_mean, y_std = train["action"].mean(0), train["action"].std(0)
    x = torch.from_numpy((x_train - mean) / std)
    y = torch.from_numpy(((train["action"] - y_mean) / y_std).astype(np.float32))
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (512,))
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = net(torch.from_numpy((x_heldout - mean) / std)).numpy() * y_std + y_mean
    scores = {}
    for k, task in enumerate(heldout["task_names"]):
        chosen = heldout["task_id"] == k
        if chosen.any():
            scores[str(task)] = [pearson(predicted[chosen, d], heldout["action"][chosen, d]) for d in range(3)]
    return scores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a checkpoint with object tokens (policy.object_slots > 0)")
    parser.add_argument("--train", required=True, help="RLDS builder directory the MLP is fit on")
    parser.add_argument("--heldout", required=True, help="RLDS builder directory of held-out episodes")
    parser.add_argument("--stride", type=int, default=2, help="every n-th training frame")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    import policies

    torch.set_num_threads(args.threads)
    policy = policies.load_pretrained(args.policy).eval()
    if policy.object_readout is None:
        raise SystemExit(f"{args.policy} has no object readout (policy.object_slots=0)")
    if policy.config.wrist_image:
        raise SystemExit(f"{args.policy} reads the wrist camera; this probe reads the primary camera's recorded frames "
                         "only: use benchmarks/action_learnability.py")
    train, heldout = frames(policy, args.train, args.stride), frames(policy, args.heldout, 1)
    base = ["state", "task", "words"]
    report = {"policy": args.policy, "train_frames": len(train["action"]), "heldout_frames": len(heldout["action"]),
              "state_and_instruction": fit_and_score(train, heldout, base, args.steps, 0),
              "with_located_objects": fit_and_score(train, heldout, base + ["located", "relative"], args.steps, 0)}
    print(f"{report['train_frames']} training frames, {report['heldout_frames']} held-out frames; held-out r (x, y, z)")
    print("| task | state + instruction | + located objects |")
    print("|---|---|---|")
    for task in report["state_and_instruction"]:
        fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
        print(f"| {task} | {fmt(report['state_and_instruction'][task])} | {fmt(report['with_located_objects'][task])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
