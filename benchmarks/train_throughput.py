"""Training throughput of the real trainer (samples/s, data-wait fraction), DDP 2 vs 1 process, eval s/episode.

    python benchmarks/train_throughput.py                       # tiny OpenVLA, the default's data, CPU
    python benchmarks/train_throughput.py --steps 300 --eval-checkpoint runs/default/final

Runs `python -m embodied.train` (one process) and `torchrun --nproc_per_node=2 -m embodied.train`
side by side on the same data with the same per-process batch, and reads their metrics.jsonl:
samples/s is global (all processes), measured after a warm-up window. Then `embodied.eval` times
episodes of a checkpoint (by default the one-process run's, whose failures run to the step limit:
a worst case). Data come from --data-dir; the trainer collects them there when missing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, steps: int, data_dir: str, batch: int, processes: int, extra: list[str]) -> dict:
    args = [f"output_dir={out}", f"max_steps={steps}", "eval.final=false", "checkpoint.every=0", "log_every=10",
            "wandb.mode=disabled", "num_threads=1", f"data.data_dir={data_dir}", f"data.batch_size={batch}",
            "cpu_processes=1", *extra]  # the processes are this script's choice (the recipe would start two)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    subprocess.run([*launcher, "-m", "embodied.train", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    windows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "samples_per_s" in r]
    steady = windows[1:] or windows  # the first window holds start-up (graph warm-up, shuffle buffer fill)
    return {"processes": processes, "samples_per_s": float(np.median([w["samples_per_s"] for w in steady])),
            "data_wait_fraction": float(np.median([w["data_wait_fraction"] for w in steady])), "windows": len(steady)}


def eval_seconds(checkpoint: str, out: Path, episodes: int, backend: str) -> dict:
    subprocess.run([sys.executable, "-m", "embodied.eval", f"policy={checkpoint}", f"backend={backend}",
                    f"episodes_per_task={episodes}", "videos_per_task=0", f"output_dir={out}"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / "results.json").read_text())
    return {"backend": backend, "episodes": results["overall"]["episodes"], **results["timing"],
            "success_rate": results["overall"]["success_rate"],
            "mean_length": float(np.mean([t["mean_length"] for t in results["tasks"].values()]))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="per process")
    parser.add_argument("--data-dir", default="data/rlds")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--eval-checkpoint", default=None, help="default: the one-process run's final/")
    parser.add_argument("--eval-episodes", type=int, default=2, help="per task")
    parser.add_argument("--eval-backend", default="mujoco")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both training runs")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report = {"cpu_count": os.cpu_count(), "steps": args.steps, "batch_per_process": args.batch}
        report["single"] = train(tmp / "single", args.steps, args.data_dir, args.batch, 1, args.overrides)
        print(f"1 process : {report['single']['samples_per_s']:.1f} samples/s, "
              f"data wait {report['single']['data_wait_fraction']:.1%}", flush=True)
        if not args.skip_ddp:
            report["ddp"] = train(tmp / "ddp", args.steps, args.data_dir, args.batch, 2, args.overrides)
            report["ddp_ratio"] = report["ddp"]["samples_per_s"] / report["single"]["samples_per_s"]
            print(f"2 processes (DDP): {report['ddp']['samples_per_s']:.1f} samples/s, data wait "
                  f"{report['ddp']['data_wait_fraction']:.1%}; ratio to 1 process {report['ddp_ratio']:.2f}x",
                  flush=True)
        checkpoint = args.eval_checkpoint or str(tmp / "single" / "final")
        report["eval"] = eval_seconds(checkpoint, tmp / "eval", args.eval_episodes, args.eval_backend)
        print(f"eval ({args.eval_backend}, {report['eval']['episodes']} episodes, mean length "
              f"{report['eval']['mean_length']:.0f} steps): {report['eval']['seconds_per_episode']:.2f} s/episode "
              f"with {report['eval']['num_envs']} envs (goal < 1 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
