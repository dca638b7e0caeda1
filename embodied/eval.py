"""`python -m embodied.eval policy=scripted|random|<checkpoint> suite=... backend=...`"""
from __future__ import annotations


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from embodied.evaluation import EvalConfig, evaluate, make_eval_policy, results_markdown


def config_from_hydra(cfg: DictConfig, image_size: int = 224, wrist_camera: bool = False) -> EvalConfig:
    """`image_size` and `wrist_camera` are used when the config leaves them null (what a checkpoint was
    trained on)."""
    randomization = cfg.randomization
    if isinstance(randomization, DictConfig):
        randomization = OmegaConf.to_container(randomization)
    tasks = list(cfg.tasks) if cfg.tasks else None
    wrist = wrist_camera if cfg.wrist_camera is None else cfg.wrist_camera
    return EvalConfig(suite=cfg.suite, backend=cfg.backend, episodes_per_task=int(cfg.episodes_per_task), tasks=tasks,
                      num_envs=int(cfg.num_envs), seed=int(cfg.seed), randomization=randomization,
                      image_size=int(cfg.image_size or image_size), wrist_camera=bool(wrist),
                      videos_per_task=int(cfg.videos_per_task), vector=cfg.vector)


def set_policy_threads(num_threads, num_envs: int) -> int:
    """torch threads for the policy: `auto` leaves one core to each env worker (at least one thread);
    on 2 cores, a 2-thread policy competing with 2 env workers made evaluation slower."""
    import os

    import torch

    if num_threads in (None, "auto"):
        num_threads = max(1, (os.cpu_count() or 1) - num_envs)
    torch.set_num_threads(int(num_threads))
    return int(num_threads)


# Apps that take a policy checkpoint path (eval, deploy, serve) live in conf/rollout: Hydra would
# read `policy=PATH` as a choice of the training config group `policy` in conf/.
@hydra.main(version_base="1.3", config_path="conf/rollout", config_name="eval")
def main(cfg: DictConfig) -> dict:
    output_dir = HydraConfig.get().runtime.output_dir
    policy = make_eval_policy(str(cfg.policy), seed=int(cfg.seed), n_action_steps=cfg.get("n_action_steps"),
                              binarize_gripper=cfg.get("binarize_gripper"),
                              gripper_threshold=cfg.get("gripper_threshold"),
                              gripper_switch_threshold=cfg.get("gripper_switch_threshold"),
                              temporal_ensemble_coeff=cfg.get("temporal_ensemble_coeff"),
                              instruction_clauses=cfg.get("instruction_clauses"),
                              clause_hold_tolerance=cfg.get("clause_hold_tolerance"),
                              clause_still_steps=cfg.get("clause_still_steps"),
                              clause_done_threshold=cfg.get("clause_done_threshold"),
                              clause_release_opening=cfg.get("clause_release_opening"))
    trained = getattr(policy, "policy", None)
    trained_config = getattr(trained, "config", None)
    eval_cfg = config_from_hydra(cfg, getattr(trained_config, "observation_image_size", 224),
                                 getattr(trained_config, "wrist_image", False))
    if trained is not None:
        set_policy_threads(cfg.get("num_threads", "auto"), eval_cfg.num_envs)
    if cfg.get("imagine"):
        from worldmodel.evaluate import evaluate_in_imagination

        if not cfg.get("worldmodel"):
            raise ValueError("imagine=true needs worldmodel=<a train_worldmodel output's worldmodel/ directory>")
        results = evaluate_in_imagination(policy, eval_cfg, output_dir, str(cfg.worldmodel),
                                          method=cfg.imagine_method, steps=cfg.imagine_steps)
        print(results_markdown(results))
        print(f"wrote imagined results (results.json, results.md, agreement.json, imagined-vs-sim videos/) and the "
              f"simulator's (sim/) to {output_dir}")
        return results
    results = evaluate(policy, eval_cfg, output_dir)
    print(results_markdown(results))
    print(f"wrote results.json, results.md, success_rates.png and videos/ to {output_dir}")
    return results


if __name__ == "__main__":
    main()
