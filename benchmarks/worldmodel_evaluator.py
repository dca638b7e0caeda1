"""The world model as a policy evaluator: success in imagination vs in the simulator.

    python benchmarks/worldmodel_evaluator.py --worldmodel RUN/worldmodel --tasks ReachTarget,PressButton,PickCube
    python benchmarks/worldmodel_evaluator.py --worldmodel SEED0/worldmodel SEED1/worldmodel   # one simulated run

Policies of graded skill: the scripted expert with Gaussian noise of increasing scale added to its
translation and rotation commands (`--noise`), plus uniform random actions. Each runs in the
simulator on the suite's evaluation seeds (never used for training data), and every episode is
replayed open-loop in the world model from the same initial frame (`worldmodel.evaluate`).
Reported: each policy's success rate both ways, and SimplerEnv's Pearson r and MMRV between them, with
95% intervals from resampling each policy's episodes, and both within each task (`--rescore --output-dir
DIR` recomputes them for an earlier run). Several world models (training seeds, recipes) judge the same
simulated episodes, so their spread is their own, not the episodes' draw.
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


def score(output_dir: Path, policies, tasks: list[str], episodes_per_task: int | None, steps) -> dict:
    """Agreement of one world model's imagined outcomes with the simulator's, from `output_dir`'s files."""
    from worldmodel.metrics import bootstrap_agreement, mmrv, pearson, task_agreement

    rows, outcomes, policy_episodes = [], [], []
    for policy in policies:
        out = output_dir / policy.name
        if not (out / "episodes.jsonl").is_file():
            raise FileNotFoundError(f"{out / 'episodes.jsonl'} is missing: --rescore reads a finished run's output")
        sim = json.loads((out / "sim" / "results.json").read_text())
        imagined = json.loads((out / "results.json").read_text())
        agreement = json.loads((out / "agreement.json").read_text())
        episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines() if line.strip()]
        outcomes.append(([e["success"] for e in episodes], [e["sim_success"] for e in episodes]))
        policy_episodes.append(episodes)
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
              "episode_agreement": agreement, "per_task": task_agreement(policy_episodes), "tasks": tasks,
              "episodes_per_task": episodes_per_task or rows[0]["episodes"] // len(tasks), "maskgit_steps": steps}
    print("| policy | sim success | imagined success | episodes agreeing |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['sim']:.2f} | {r['imagined']:.2f} | {r['episodes_agreeing']:.2f} |")
    (r_low, r_high), (m_low, m_high) = result["pearson_interval"], result["mmrv_interval"]
    print(f"Pearson r = {result['pearson']:.3f} (95% bootstrap over episodes {r_low:.2f} to {r_high:.2f}), "
          f"MMRV = {result['mmrv']:.3f} ({m_low:.2f} to {m_high:.2f}), {len(rows)} policies; imagined rates span "
          f"{result['imagined_span']:.2f} (simulated {result['sim_span']:.2f}); episodes judged as in the "
          f"simulator: {agreement:.2f}")
    # per task: a ranking pooled over tasks can hide a task that imagination gets wrong
    per_task = result["per_task"]
    print("| policy | " + " | ".join(f"{t}: imagined / sim" for t in per_task["tasks"]) + " |")
    print("|---|" + "---|" * len(per_task["tasks"]))
    for i, r in enumerate(rows):
        cells = [f"{t['imagined'][i]:.2f} / {t['sim'][i]:.2f}" for t in per_task["tasks"].values()]
        print(f"| {r['policy']} | " + " | ".join(cells) + " |")
    print("per task: " + ", ".join(f"{name} r {t['pearson']:.2f} MMRV {t['mmrv']:.2f}"
                                   for name, t in per_task["tasks"].items())
          + f"; mean r {per_task['mean_pearson']:.3f}, mean MMRV {per_task['mean_mmrv']:.3f}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worldmodel", nargs="+",
                        help="the world model(s) to evaluate; several (e.g. training seeds) judge the same simulated "
                             "episodes, each into OUTPUT_DIR/worldmodel_<i>/ (not needed with --rescore)")
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
    from worldmodel.evaluate import evaluate_in_imaginations
    from worldmodel.model import WorldModel

    tasks = args.tasks.split(",")
    policies = [NoisyExpert(float(s), seed=i) for i, s in enumerate(args.noise.split(","))]
    if args.random:
        policies.append(RandomPolicy(0))
    output_dir = Path(args.output_dir)
    started = time.time()
    steps = args.steps
    if args.rescore:
        dirs = sorted(output_dir.glob("worldmodel_*")) or [output_dir]
    else:
        worlds = [WorldModel.from_pretrained(path) for path in args.worldmodel]
        dirs = [output_dir / f"worldmodel_{i}" for i in range(len(worlds))] if len(worlds) > 1 else [output_dir]
        cfg = EvalConfig(backend=args.backend, episodes_per_task=args.episodes_per_task, tasks=tasks,
                         num_envs=2, image_size=worlds[0].image_size, videos_per_task=1)
        for policy in policies:
            imagined = evaluate_in_imaginations(policy, cfg, [d / policy.name for d in dirs], worlds, steps=args.steps,
                                                show_progress=False)
            steps = imagined[0]["imagination"]["steps"]
    results = []
    for i, directory in enumerate(dirs):
        if len(dirs) > 1:
            source = args.worldmodel[i] if args.worldmodel else directory.name
            print(f"\n## world model {i}: {source}")
        results.append(score(directory, policies, tasks, None if args.rescore else args.episodes_per_task, steps))
    if len(dirs) > 1:  # the same simulated episodes judged by each: the spread is the world models' own
        r_values = np.array([r["pearson"] for r in results])
        mmrvs = np.array([r["mmrv"] for r in results])
        summary = {"worldmodels": [str(d) for d in dirs], "pearson": r_values.tolist(), "mmrv": mmrvs.tolist(),
                   "pearson_mean": float(np.nanmean(r_values)), "mmrv_mean": float(mmrvs.mean())}
        print(f"\nover {len(dirs)} world models: Pearson r {', '.join(f'{r:.3f}' for r in r_values)} "
              f"(mean {summary['pearson_mean']:.3f}); MMRV {', '.join(f'{m:.3f}' for m in mmrvs)} "
              f"(mean {summary['mmrv_mean']:.3f})")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not args.rescore:
        print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
