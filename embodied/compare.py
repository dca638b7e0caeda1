"""Compare evaluations side by side, and recipes over several training seeds.

    python -m embodied.compare runs/a/eval/mujoco runs/b/eval/mujoco
    # one recipe's seeds form a group: its row is their mean, its interval pools their episodes
    python -m embodied.train -m seed=0,1,2 eval.episodes_per_task=30 output_dir=runs/sweep
    python -m embodied.compare 'base=runs/default*/eval30' 'new=runs/sweep/*/eval/mujoco' --plot compare.png

Each argument is an evaluation directory (its `results.json`), a results.json, or LABEL=PATH; a PATH may be
a glob pattern. Arguments with the same label are one group. Every evaluation must have run the same
suite, backend and initial states (episode seeds) per task, or the comparison is refused, naming the
evaluation at fault: a difference that comes from other initial states is not a difference of policies.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embodied.evaluation import wilson_interval


@dataclass
class Group:
    label: str
    paths: list[Path] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)


def results_file(path: Path) -> Path:
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no results.json there (give an evaluation's output directory, e.g. "
                                f"runs/<run>/eval/mujoco, or its results.json)")
    return file


def parse_groups(arguments: list[str]) -> list[Group]:
    groups: dict[str, Group] = {}
    for argument in arguments:
        label, sep, pattern = argument.partition("=")
        # a path may hold "=" itself (Hydra's override-named run directories): then it is no label
        if not sep or "/" in label or Path(argument).exists():
            label, pattern = "", argument
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"{argument}: the pattern {pattern!r} matches nothing")
        for match in matches:
            path = Path(match)
            group = groups.setdefault(label or str(path), Group(label or str(path)))
            file = results_file(path)
            try:
                results = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: not valid JSON ({err})") from None
            missing = sorted({"suite", "backend", "tasks", "episode_seeds"} - set(results))
            if missing:
                raise ValueError(f"{file}: not an evaluation's results (no {', '.join(missing)})")
            group.results.append(results)
            group.paths.append(path)
    return list(groups.values())


def check_comparable(groups: list[Group]) -> list[str]:
    """The tasks every evaluation ran, in the first one's order; refuses evaluations of other episodes."""
    first_path, first = groups[0].paths[0], groups[0].results[0]
    for group in groups:
        for path, results in zip(group.paths, group.results):
            for key in ("suite", "backend"):
                if results.get(key) != first.get(key):
                    raise ValueError(f"{path}: {key} {results.get(key)!r}, but {first_path} has {first.get(key)!r}")
    tasks = [t for t in first["tasks"] if all(t in r["tasks"] for g in groups for r in g.results)]
    if not tasks:
        raise ValueError("the evaluations have no task in common")
    for group in groups:
        for path, results in zip(group.paths, group.results):
            for task in tasks:
                if results["episode_seeds"][task] != first["episode_seeds"][task]:
                    raise ValueError(f"{path}: {task} ran other initial states than {first_path} "
                                     f"({len(results['episode_seeds'][task])} against "
                                     f"{len(first['episode_seeds'][task])} episodes, or other seeds); "
                                     f"evaluate both with the same suite, seed and episodes_per_task")
    return tasks


def group_summary(group: Group, tasks: list[str]) -> dict:
    """Per task and overall (over the common tasks): each run's rate, their mean, and the Wilson interval of
    all their episodes pooled."""
    counts = {t: [(round(r["tasks"][t]["success_rate"] * r["tasks"][t]["episodes"]), r["tasks"][t]["episodes"])
                  for r in group.results] for t in tasks}
    counts["overall"] = [tuple(map(sum, zip(*(counts[t][i] for t in tasks)))) for i in range(len(group.results))]
    out = {}
    for task, runs in counts.items():
        wins, episodes = sum(w for w, _ in runs), sum(n for _, n in runs)
        rates = [w / n for w, n in runs]
        out[task] = {"runs": rates, "mean": float(np.mean(rates)), "ci95": list(wilson_interval(wins, episodes)),
                     "episodes": episodes}
    return out


def markdown(groups: list[Group], summaries: list[dict], tasks: list[str]) -> str:
    lines = ["| run | " + " | ".join(tasks) + " | overall (95% CI) |", "|---" * (len(tasks) + 2) + "|"]
    for group, summary in zip(groups, summaries):
        several = len(group.results) > 1
        if several:
            for i, path in enumerate(group.paths):
                cells = [f"{summary[t]['runs'][i]:.0%}" for t in tasks + ["overall"]]
                lines.append(f"| {path} | " + " | ".join(cells) + " |")
        name = f"**{group.label}: mean of {len(group.results)}**" if several else group.label
        cells = [f"{summary[t]['mean']:.0%}" for t in tasks]
        lo, hi = summary["overall"]["ci95"]
        cells.append(f"{summary['overall']['mean']:.1%} ({lo:.0%}-{hi:.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stages_markdown(groups: list[Group], tasks: list[str]) -> str:
    """How far episodes got: per task stage, each group's mean share of episodes that reached it (over its runs
    that recorded stages; "-" where none did). Empty when no evaluation recorded any."""
    rows = []
    for task in tasks:
        names = []
        for group in groups:
            for results in group.results:
                names += [n for n in results["tasks"][task].get("stages", {}) if n not in names]
        for name in names:
            cells = []
            for group in groups:
                shares = [r["tasks"][task]["stages"][name] for r in group.results
                          if name in r["tasks"][task].get("stages", {})]
                cells.append(f"{np.mean(shares):.0%}" if shares else "-")
            rows.append(f"| {task}: {name} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    labels = [f"{g.label} ({len(g.results)})" if len(g.results) > 1 else g.label for g in groups]
    return "\n".join(["| stage reached | " + " | ".join(labels) + " |", "|---" * (len(groups) + 1) + "|", *rows]) + "\n"


def plot(path: Path, groups: list[Group], summaries: list[dict], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = tasks + ["overall"]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(columns) + 2), 4))
    x = np.arange(len(columns))
    for i, (group, summary) in enumerate(zip(groups, summaries)):
        means = np.array([summary[t]["mean"] for t in columns])
        # bars: the mean over the group's runs; whiskers: its lowest and highest run
        low = means - np.array([min(summary[t]["runs"]) for t in columns])
        high = np.array([max(summary[t]["runs"]) for t in columns]) - means
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, means, width, yerr=[low, high], capsize=2,
               label=f"{group.label} ({len(group.results)} run{'s' if len(group.results) > 1 else ''})")
    ax.set_xticks(x, columns, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success (mean; whiskers: runs min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m embodied.compare", description=__doc__.split("\n")[0])
    parser.add_argument("evaluations", nargs="+", help="evaluation directories or results.json files; LABEL=PATH "
                                                        "groups runs (e.g. training seeds) under LABEL; globs allowed")
    parser.add_argument("--plot", type=Path, help="also draw the groups' per-task success as bars (PNG)")
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    groups = parse_groups(args.evaluations)
    tasks = check_comparable(groups)
    summaries = [group_summary(g, tasks) for g in groups]
    table = markdown(groups, summaries, tasks)
    stages = stages_markdown(groups, tasks)
    if stages:
        table += "\n" + stages
    episodes = groups[0].results[0]["tasks"][tasks[0]]["episodes"]
    header = (f"{groups[0].results[0]['suite']} on {groups[0].results[0]['backend']}, {episodes} episodes per task "
              f"(the same initial states in every run)\n\n")
    print(header + table)
    if args.output:
        args.output.write_text(header + table)
    if args.plot:
        plot(args.plot, groups, summaries, tasks)
    return table


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
