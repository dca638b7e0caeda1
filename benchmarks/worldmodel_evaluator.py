"""The world model as a policy evaluator: success in imagination vs in the simulator.

    python benchmarks/worldmodel_evaluator.py --worldmodel RUN/worldmodel --tasks ReachTarget,PressButton,PickCube

Policies of graded skill: the scripted expert with Gaussian noise of increasing scale added to its
translation and rotation commands (`--noise`), plus uniform random actions. Each runs in the
simulator on the suite's evaluation seeds (never used for training data), and every episode is
replayed open-loop in the world model from the same initial frame (`worldmodel.evaluate`).
Reported: each policy's success rate both ways, and SimplerEnv's Pearson r and MMRV between them, with
95% intervals from resampling each policy's episodes (`--rescore --output-dir DIR` recomputes them for an
earlier run).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


class NoisyExpert:
    """The scripted expert plus N(0, scale² · bound²) noise on the six pose dimensions."""

    def __init__(self, scale: float, seed: int = 0):
        self.scale, self.rng = scale, np.random.default_rng(seed)
        self.name = f"expert+noise{scale:g}"

    def reset(self, env_indices):
        pass

    def act(self, observations, envs):
        from envs.env import ACTION_HIGH, ACTION_LOW

        actions = np.stack(envs.call("expert_action")).astype(np.float32)
        actions[:, :6] += self.rng.normal(size=(len(actions), 6)) * self.scale * ACTION_HIGH[:6]
        return np.clip(actions, ACTION_LOW, ACTION_HIGH).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worldmodel", help="the world model to evaluate (not needed with --rescore)")
    parser.add_argument("--tasks", default="ReachTarget,PressButton,PickCube")
    parser.add_argument("--backend", default="pybullet")
    parser.add_argument("--episodes-per-task", type=int, default=8)
    parser.add_argument("--noise", default="0,0.5,1,2", help="expert noise scales (fractions of the action bound)")
    parser.add_argument("--random", action="store_true", default=True)
    parser.add_argument("--steps", type=int, default=None,
                        help="MaskGIT steps (default: as the success detector was trained)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default="outputs/worldmodel_evaluator")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the summary from --output-dir's episodes, running nothing")
    args = parser.parse_args()
    if not args.rescore and not args.worldmodel:
        parser.error("--worldmodel is required (or --rescore an earlier run's --output-dir)")
    torch.set_num_threads(args.threads)

    from embodied.evaluation import EvalConfig, RandomPolicy
    from worldmodel.evaluate import evaluate_in_imagination
    from worldmodel.metrics import bootstrap_agreement, mmrv, pearson
    from worldmodel.model import WorldModel

    cfg_tasks = args.tasks.split(",")
    policies = [NoisyExpert(float(s), seed=i) for i, s in enumerate(args.noise.split(","))]
    if args.random:
        policies.append(RandomPolicy(0))
    started = time.time()
    steps = args.steps
    if not args.rescore:
        world = WorldModel.from_pretrained(args.worldmodel)
        cfg = EvalConfig(backend=args.backend, episodes_per_task=args.episodes_per_task, tasks=cfg_tasks,
                         num_envs=2, image_size=world.image_size, videos_per_task=1)
        for policy in policies:
            out = Path(args.output_dir) / policy.name
            imagined = evaluate_in_imagination(policy, cfg, out, world, steps=args.steps, show_progress=False)
            steps = imagined["imagination"]["steps"]
    rows, outcomes = [], []
    for policy in policies:
        out = Path(args.output_dir) / policy.name
        if not (out / "episodes.jsonl").is_file():
            raise FileNotFoundError(f"{out / 'episodes.jsonl'} is missing: --rescore reads a finished run's output")
        sim = json.loads((out / "sim" / "results.json").read_text())
        imagined = json.loads((out / "results.json").read_text())
        agreement = json.loads((out / "agreement.json").read_text())
        episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines() if line.strip()]
        outcomes.append(([e["success"] for e in episodes], [e["sim_success"] for e in episodes]))
        rows.append({"policy": policy.name, "sim": sim["overall"]["success_rate"],
                     "imagined": imagined["overall"]["success_rate"],
                     "episodes_agreeing": agreement["episodes_agreeing"], "episodes": sim["overall"]["episodes"]})
        print(f"{policy.name}: sim {rows[-1]['sim']:.2f}, imagined {rows[-1]['imagined']:.2f}, "
              f"episode agreement {rows[-1]['episodes_agreeing']:.2f}", flush=True)
    sim_rates = [r["sim"] for r in rows]
    imagined_rates = [r["imagined"] for r in rows]
    try:
        r_value = pearson(imagined_rates, sim_rates)
    except ValueError as error:  # a constant column
        r_value = float("nan")
        print(f"pearson undefined: {error}")
    # Pearson r ignores scale: a detector that fires on nearly every episode can still rank the policies by a
    # few points. The span of the imagined rates and the share of episodes judged as the simulator judged them
    # show whether the imagined rates mean anything on their own; the bootstrap, whether the ranking survives
    # another draw of the episodes.
    episodes = sum(r["episodes"] for r in rows)
    agreement = sum(r["episodes_agreeing"] * r["episodes"] for r in rows) / max(episodes, 1)
    result = {"rows": rows, "pearson": r_value, "mmrv": mmrv(imagined_rates, sim_rates),
              **bootstrap_agreement(outcomes, seed=0),
              "imagined_span": max(imagined_rates) - min(imagined_rates), "sim_span": max(sim_rates) - min(sim_rates),
              "episode_agreement": agreement, "tasks": cfg_tasks,
              "episodes_per_task": rows[0]["episodes"] // len(cfg_tasks) if args.rescore else args.episodes_per_task,
              "maskgit_steps": steps}
    if not args.rescore:
        result["seconds"] = round(time.time() - started, 1)
    print("| policy | sim success | imagined success | episodes agreeing |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['sim']:.2f} | {r['imagined']:.2f} | {r['episodes_agreeing']:.2f} |")
    (r_low, r_high), (m_low, m_high) = result["pearson_interval"], result["mmrv_interval"]
    print(f"Pearson r = {result['pearson']:.3f} (95% bootstrap over episodes {r_low:.2f} to {r_high:.2f}), "
          f"MMRV = {result['mmrv']:.3f} ({m_low:.2f} to {m_high:.2f}), {len(rows)} policies; imagined rates span "
          f"{result['imagined_span']:.2f} (simulated {result['sim_span']:.2f}); episodes judged as in the "
          f"simulator: {agreement:.2f}")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
