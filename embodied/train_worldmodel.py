"""`python -m embodied.train_worldmodel`: train the world model on an RLDS dataset or mixture.

Three stages by default (plus an optional fourth), one run, one step counter:

1. `tokenizer`: the FSQ frame tokenizer on single frames (reconstruction loss, PSNR logged; on the
   held-out episodes, the share of token changes in still patches, `tokenizer_val_flicker`);
   (optional, `stages=[tokenizer,latent_actions,...]`) `latent_actions`: Genie's latent action model on
   pairs of consecutive frames' tokens, without the actions (`worldmodel/latent_actions.py`); its
   next-frame token accuracy with the inferred latent, a random latent and copy-last-frame is
   measured on the held-out episodes;
2. `dynamics`: every episode is tokenized once (`encode_sequence`: with `hold_threshold` the codes of
   still patches are held), then the ST-transformer trains on random clips
   of `worldmodel.dynamics.max_frames` frames with random mask rates (MaskGIT and raster masks);
3. `detector`: the success detector on imagined frames: every training episode is replayed
   open-loop in the trained dynamics from its first frame, and the imagined frame after action t
   gets that step's reward label; its threshold is set on held-out episodes, per episode.

With no argument it trains on `data/rlds/embodied_tabletop10_pybullet_perturbed` (the experts under noise of
~0.6x the action bounds on every pose command, actions recorded as executed, failures kept: the dynamics sees
what actions outside the experts' habits do, and the detector's threshold is calibrated on both outcomes) and
`embodied_tabletop10_pybullet` (expert demonstrations), all normalized with the first one's statistics
(`data.shared_statistics`), and first collects either one that is missing with the scripted experts
(`data.collect` names each dataset it may collect, with its `embodied.collect` settings).

Output (`output_dir`, printed at the end): `.hydra/` (resolved config), `metrics.jsonl`,
wandb offline files, `checkpoints/step_*` (atomic, `checkpoint.keep_last` kept; each holds the
models trained so far, optimizer/scheduler/RNG state and the data sampler position), and
`worldmodel/` (the final `WorldModel.from_pretrained` directory) with `train_summary.json`.
`resume=true` (default) continues from the newest checkpoint in the output dir;
`resume=PATH` from a given checkpoint or run directory. `stages=[dynamics,detector]
init_from=RUN/worldmodel` trains only those parts and takes the others from a saved world model
(`stages=[latent_actions] init_from=RUN/worldmodel` adds a latent action model to one).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from embodied.checkpointing import (CHECKPOINT_DIR, latest_checkpoint, load_training_state, read_counters,
                                    save_checkpoint, save_training_state)

STAGES = ("tokenizer", "latent_actions", "dynamics", "detector")  # the order they train in
DEFAULT_STAGES = ("tokenizer", "dynamics", "detector")  # without `stages=`: the latent action model is opt-in
OPTIONAL = ("latent_actions", "detector")  # parts a world model may lack
FOLDERS = {"tokenizer": "tokenizer", "latent_actions": "latent_actions", "dynamics": "dynamics",
           "detector": "success_detector"}  # each part's folder in a saved world model


# -- configs ------------------------------------------------------------------------------------------

def build_configs(cfg: DictConfig, tokenizer_config=None):
    """Tokenizer, dynamics, detector and latent action model configs; the others follow `tokenizer_config`
    when given (a tokenizer taken from `init_from`) rather than the worldmodel group's."""
    from worldmodel.dynamics import DynamicsConfig
    from worldmodel.latent_actions import LatentActionConfig
    from worldmodel.success import SuccessDetectorConfig
    from worldmodel.tokenizer import TokenizerConfig

    wm = OmegaConf.to_container(cfg.worldmodel, resolve=True)
    tok = tokenizer_config or TokenizerConfig(**wm["tokenizer"])
    dyn = DynamicsConfig(codebook_size=tok.codebook_size, grid=tok.grid, tokenizer_image_size=tok.image_size,
                         tokenizer_levels=tok.levels, **wm["dynamics"])
    det = SuccessDetectorConfig(codebook_size=tok.codebook_size, grid=tok.grid, **wm["detector"])
    lam = LatentActionConfig(codebook_size=tok.codebook_size, grid=tok.grid, tokenizer_image_size=tok.image_size,
                             tokenizer_levels=tok.levels, **(wm.get("latent_actions") or {}))
    return tok, dyn, det, lam


def ensure_data(cfg: DictConfig) -> None:
    """Collect each missing dataset that `data.collect` names, when `data.collect_if_missing` is set."""
    from embodied.data import resolve_builder_dir
    from embodied.data.errors import DatasetNotFoundError
    from embodied.data.mixtures import parse_datasets

    for name, _ in parse_datasets(OmegaConf.to_container(cfg.data.datasets, resolve=True)
                                  if not isinstance(cfg.data.datasets, str) else cfg.data.datasets):
        try:
            resolve_builder_dir(name, cfg.data.data_dir)
        except DatasetNotFoundError:
            recipes = OmegaConf.to_container(cfg.data.collect, resolve=True) if cfg.data.collect else {}
            if not cfg.data.collect_if_missing or cfg.data.data_dir is None or name not in recipes:
                raise
            from embodied.collect import CollectConfig, collect

            values = recipes[name]
            print(f"[train_worldmodel] {name} not found under {cfg.data.data_dir}: collecting it with the "
                  f"scripted experts ({values})", flush=True)
            collect(CollectConfig(dataset_name=name, image_size=int(cfg.worldmodel.tokenizer.image_size), **values),
                    cfg.data.data_dir)


# -- helpers ------------------------------------------------------------------------------------------

def warmup_cosine(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def tokenize_episodes(tokenizer, episodes, show_progress: bool = True) -> None:
    tokenizer.eval()
    for ep in tqdm(episodes, desc="tokenize episodes", unit="ep", disable=not show_progress, leave=False):
        ep.tokens = tokenizer.encode_sequence(ep.images).cpu().numpy().astype(np.int16)  # still codes held


@torch.no_grad()
def tokenizer_psnr(tokenizer, frames: np.ndarray, batch: int = 256) -> float:
    from worldmodel.tokenizer import psnr_from_mse

    tokenizer.eval()
    errors = []
    for i in range(0, len(frames), batch):
        chunk = frames[i:i + batch]
        recon = tokenizer.decode(tokenizer.encode(chunk))
        target = torch.from_numpy(chunk).float() / 255
        errors.append(((recon - target) ** 2).mean((1, 2, 3)))
    return psnr_from_mse(float(torch.cat(errors).mean()))


@torch.no_grad()
def tokenizer_flicker(tokenizer, episodes) -> dict[str, float]:
    """How stable the tokenizer's codes are over the episodes (`worldmodel.metrics.token_flicker`)."""
    from worldmodel.metrics import token_flicker

    tokenizer.eval()
    return token_flicker([(e.images, tokenizer.encode_sequence(e.images).cpu().numpy()) for e in episodes],
                         tokenizer.config.downsample)


@torch.no_grad()
def dynamics_eval(dynamics, sampler, rng, batches: int = 4, batch_size: int = 8) -> dict[str, float]:
    dynamics.eval()
    gen = torch.Generator().manual_seed(0)
    metrics: dict[str, list[float]] = {}
    for _ in range(batches):
        loss, m = dynamics.loss(**clip_tensors(dynamics, sampler.sample(batch_size, rng)), generator=gen)
        for key, value in m.items():
            metrics.setdefault(key, []).append(value)
    dynamics.train()
    return {key: float(np.mean(values)) for key, values in metrics.items()}


def clip_tensors(dynamics, clip) -> dict[str, torch.Tensor | None]:
    """A sampled clip as the dynamics loss's arguments (states only for a model that imagines them)."""
    tokens, actions, states = clip
    use_states = bool(dynamics.config.state_dim)
    if use_states and states is None:
        raise ValueError("the dynamics model imagines robot states (state_dim > 0) but the episodes have none")
    return {"tokens": torch.from_numpy(tokens), "actions": torch.from_numpy(actions),
            "states": torch.from_numpy(states) if use_states else None}


def detector_data(dynamics, episodes, det_cfg, scfg, seed: int, show_progress: bool = True) -> dict[str, Any]:
    """The detector's examples: imagined frames of open-loop replays of the training episodes.

    A `calibration_fraction` of the successful episodes and a `failure_calibration_fraction` (default: the
    same) of the failed ones are held out of the detector's training to choose its episode-level threshold
    (each outcome apart, so that the few failures are there too); `random_action_negatives` adds that share
    of replays of the training episodes under uniform random (normalized) actions as failures. (Such replays
    in the calibration set too made the default world model rank worse, benchmarks/RESULTS.md.)"""
    from worldmodel.rollouts import imagine_episodes
    from worldmodel.success import frame_references

    rng = np.random.default_rng(seed)
    imagined, imagined_states = imagine_episodes(dynamics, episodes, det_cfg.rollout_method, det_cfg.rollout_steps,
                                                 seed, show_progress=show_progress)
    labels = [e.rewards > 0 for e in episodes]
    succeeded = np.array([y.any() for y in labels])
    cal, train_ids = [], []
    failure_fraction = getattr(scfg, "failure_calibration_fraction", None)
    fractions = (scfg.calibration_fraction, scfg.calibration_fraction if failure_fraction is None else failure_fraction)
    for group, fraction in zip((np.flatnonzero(succeeded), np.flatnonzero(~succeeded)), fractions):
        group = rng.permutation(group)  # both outcomes in both parts
        n_cal = int(round(float(fraction) * len(group)))
        cal += group[:n_cal].tolist()
        train_ids += group[n_cal:].tolist()
    tokens = [imagined[i] for i in train_ids]
    states = [imagined_states[i] for i in train_ids]
    targets = [labels[i] for i in train_ids]
    references = [episodes[i].tokens[0] for i in train_ids]
    extra = int(round(float(scfg.random_action_negatives) * len(train_ids)))
    if extra:
        # a random policy (almost) never succeeds; its imagined frames teach the detector what drift looks like
        picks = [episodes[i] for i in rng.choice(train_ids, extra)]
        random_actions = []
        for e in picks:
            a = rng.uniform(-1, 1, e.actions_norm.shape).astype(np.float32)
            a[:, -1] = rng.integers(0, 2, len(a))  # the gripper is not normalized: 0/1
            random_actions.append(a)
        extra_tokens, extra_states = imagine_episodes(dynamics, picks, det_cfg.rollout_method,
                                                      det_cfg.rollout_steps, seed + 1, actions=random_actions,
                                                      show_progress=show_progress)
        tokens += extra_tokens
        states += extra_states
        targets += [np.zeros(len(e), bool) for e in picks]
        references += [e.tokens[0] for e in picks]
    use_states = bool(dynamics.config.state_dim)
    return {"tokens": np.concatenate(tokens).astype(np.int64), "labels": np.concatenate(targets),
            "states": np.concatenate(states) if use_states else None,
            # each frame's episode's first real frame (the replays start from it)
            "references": frame_references(references, tokens).astype(np.int64),
            "cal_tokens": [imagined[i] for i in cal], "cal_labels": [labels[i] for i in cal],
            "cal_states": [imagined_states[i] for i in cal] if use_states else None,
            "cal_references": [episodes[i].tokens[0] for i in cal]}


@torch.no_grad()
def latent_actions_val(model, episodes, seed: int) -> dict[str, float]:
    """Next-frame token accuracy of the latent action model on every transition of the episodes."""
    from worldmodel.latent_actions import predict_transitions, transition_metrics

    transitions = predict_transitions(model, [e.tokens.astype(np.int64) for e in episodes], seed)
    return transition_metrics(transitions, model.config.n_latent_actions)


def detector_val(dynamics, detector, episodes, seed: int) -> dict[str, float]:
    from worldmodel.rollouts import imagine_episodes
    from worldmodel.success import episode_metrics

    cfg = detector.config
    imagined, states = imagine_episodes(dynamics, episodes, cfg.rollout_method, cfg.rollout_steps, seed)
    return episode_metrics(detector.eval(), imagined, [e.rewards > 0 for e in episodes], states,
                           [e.tokens[0] for e in episodes])


# -- the run ------------------------------------------------------------------------------------------

def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    from embodied.logging_utils import RunLogger
    from worldmodel.data import ClipSampler, all_frames, load_episodes
    from worldmodel.dynamics import DynamicsModel
    from worldmodel.latent_actions import LatentActionModel
    from worldmodel.model import WorldModel
    from worldmodel.success import SuccessDetector
    from worldmodel.tokenizer import FrameTokenizer

    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    show = bool(cfg.train.progress)
    started = time.time()
    stages, loaded = trained_stages(cfg)
    tok_cfg, dyn_cfg, det_cfg, lam_cfg = build_configs(cfg, loaded["tokenizer"].config if "tokenizer" in loaded
                                                       else None)
    stage_steps = {s: int(cfg.train[s].steps) if s in stages else 0 for s in STAGES}
    offsets = dict(zip(STAGES, np.cumsum([0] + [stage_steps[s] for s in STAGES[:-1]]).tolist()))

    # -- models (parts not trained here come from init_from) and resume
    tokenizer = loaded.get("tokenizer") or FrameTokenizer(tok_cfg)
    dynamics = loaded.get("dynamics") or DynamicsModel(dyn_cfg)
    det_cfg.state_dim = dynamics.config.state_dim  # the detector reads the states this dynamics imagines
    if det_cfg.spatial_state and not det_cfg.state_dim and "detector" in stages:
        raise ValueError("worldmodel.detector.spatial_state=true compares the imagined robot state with the frame, "
                         "but this dynamics model imagines none (state_dim=0): set worldmodel.detector.spatial_state"
                         "=false, or give the dynamics a state (worldmodel.dynamics.state_dim=8)")
    detector = loaded.get("detector") or (SuccessDetector(det_cfg) if "detector" in stages else None)
    latent = loaded.get("latent_actions") or (LatentActionModel(lam_cfg) if "latent_actions" in stages else None)
    dynamics.check_tokenizer(tokenizer.fingerprint(), source=f"init_from={cfg.get('init_from')}")
    if latent is not None:
        latent.check_tokenizer(tokenizer.fingerprint(), source=f"init_from={cfg.get('init_from')}")
    resume_from = find_resume(cfg, run_dir)
    counters: dict[str, Any] = {"stage": stages[0], "stage_step": 0, "wandb_id": None, "data_rng": None}
    if resume_from is not None:
        counters.update(read_counters(resume_from))
        for name, model in (("tokenizer", tokenizer), ("latent_actions", latent), ("dynamics", dynamics),
                            ("detector", detector)):
            if model is not None and (resume_from / name).is_dir():
                saved = type(model).from_pretrained(resume_from / name)
                if saved.config != model.config:
                    raise ValueError(f"cannot resume from {resume_from}: its {name} config {saved.config} differs "
                                     f"from this run's {model.config}")
                model.load_state_dict(saved.state_dict())
        print(f"[train_worldmodel] resuming from {resume_from} (stage {counters['stage']}, "
              f"step {counters['stage_step']})", flush=True)
    # -- data
    ensure_data(cfg)
    datasets = cfg.data.datasets if isinstance(cfg.data.datasets, str) else OmegaConf.to_container(cfg.data.datasets)
    episodes, statistics, weights = load_episodes(datasets, cfg.data.data_dir, "train", tok_cfg.image_size,
                                                  cfg.data.spec, max_episodes=cfg.data.max_episodes,
                                                  show_progress=show,
                                                  shared_statistics=bool(cfg.data.get("shared_statistics")))
    statistics_key = next(iter(statistics))  # the first dataset's: what the world model normalizes with
    val_datasets = cfg.data.val_datasets or datasets
    if not isinstance(val_datasets, str):
        val_datasets = (OmegaConf.to_container(val_datasets) if isinstance(val_datasets, DictConfig)
                        else list(val_datasets))
    if val_datasets == datasets and cfg.data.val_split == "train" and cfg.data.max_episodes is None:
        val_episodes = list(episodes)  # evaluating on the training data itself: no second read
    else:
        # held-out datasets are normalized as the world model will normalize at inference
        val_episodes, _, _ = load_episodes(val_datasets, cfg.data.data_dir, cfg.data.val_split, tok_cfg.image_size,
                                           cfg.data.spec, statistics=statistics, show_progress=show,
                                           fallback_statistics=statistics[statistics_key])
    frames = all_frames(episodes)
    print(f"[train_worldmodel] {len(episodes)} train episodes ({len(frames)} frames), {len(val_episodes)} "
          f"held-out episodes from {', '.join(statistics)}", flush=True)

    logger = RunLogger(run_dir, project=cfg.wandb.project, config=OmegaConf.to_container(cfg, resolve=True),
                       mode=cfg.wandb.mode, name=cfg.wandb.name)
    rng = np.random.default_rng(int(cfg.train.seed))
    torch.manual_seed(int(cfg.train.seed))
    if counters.get("data_rng") is not None:
        rng.bit_generator.state = counters["data_rng"]
    models = {"tokenizer": tokenizer, "latent_actions": latent, "dynamics": dynamics, "detector": detector}
    summary: dict[str, Any] = {"output_dir": str(run_dir), "datasets": list(statistics), "stages": list(stages)}
    if loaded:
        summary["init_from"] = str(cfg.init_from)
    start_index = STAGES.index(counters["stage"])

    for index, stage in enumerate(STAGES):
        if index < start_index or stage not in stages:
            continue
        model = models[stage]
        if stage != "tokenizer" and episodes[0].tokens is None:
            tokenize_episodes(tokenizer, episodes + val_episodes, show_progress=show)
        sampler = None
        if stage in ("latent_actions", "dynamics"):  # the latent action model trains on pairs of frames
            sampler = ClipSampler(episodes, dyn_cfg.max_frames if stage == "dynamics" else 2, weights)
        det_data = None
        if stage == "detector":
            dynamics.eval()
            det_data = detector_data(dynamics, episodes, det_cfg, cfg.train.detector, int(cfg.train.seed), show)
        scfg = cfg.train[stage]
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(scfg.lr), weight_decay=float(scfg.weight_decay))
        scheduler = warmup_cosine(optimizer, int(scfg.warmup), stage_steps[stage])
        first = 0
        if index == start_index and resume_from is not None and counters["stage_step"] > 0:
            load_training_state(resume_from, {stage: optimizer}, {stage: scheduler})
            first = int(counters["stage_step"])
        model.train()
        bar = tqdm(range(first, stage_steps[stage]), desc=f"train {stage}", unit="step", disable=not show,
                   initial=first, total=stage_steps[stage])
        for step in bar:
            if stage == "tokenizer":
                loss, metrics = tokenizer.loss(frames[rng.integers(0, len(frames), int(scfg.batch_size))])
            elif stage == "latent_actions":
                loss, metrics = latent.loss(torch.from_numpy(sampler.sample(int(scfg.batch_size), rng)[0]))
            elif stage == "dynamics":
                loss, metrics = dynamics.loss(**clip_tensors(dynamics, sampler.sample(int(scfg.batch_size), rng)))
            else:
                labels = det_data["labels"]
                idx = rng.integers(0, len(labels), int(scfg.batch_size))
                pos_weight = float((~labels).sum() / max(labels.sum(), 1))
                states = None if det_data["states"] is None else torch.from_numpy(det_data["states"][idx])
                loss, metrics = detector.loss(torch.from_numpy(det_data["tokens"][idx]),
                                              torch.from_numpy(labels[idx]), pos_weight, states,
                                              torch.from_numpy(det_data["references"][idx]))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{stage} loss is {loss.item()} at step {step + 1}; the last good "
                                         f"checkpoint is {latest_checkpoint(run_dir / CHECKPOINT_DIR)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.train.grad_clip))
            optimizer.step()
            scheduler.step()
            done = step + 1
            global_step = offsets[stage] + done
            if done % int(cfg.train.log_every) == 0 or done == stage_steps[stage]:
                logged = {f"{stage}/{k}": v for k, v in metrics.items()}
                logger.log(logged | {f"{stage}/lr": scheduler.get_last_lr()[0]}, global_step)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
            every = int(cfg.checkpoint.every)
            if (every and done % every == 0) or done == stage_steps[stage]:
                save_run_checkpoint(run_dir, global_step, models, stage, done, optimizer, scheduler, rng,
                                    int(cfg.checkpoint.keep_last), logger)
        bar.close()
        # stage evaluation on held-out episodes
        if stage == "tokenizer":
            summary["tokenizer_val_psnr"] = tokenizer_psnr(tokenizer, all_frames(val_episodes))
            summary["tokenizer_train_psnr"] = tokenizer_psnr(tokenizer, frames[:: max(1, len(frames) // 512)])
            summary["tokenizer_val_flicker"] = tokenizer_flicker(tokenizer, val_episodes)
            logger.log({"tokenizer/val_psnr": summary["tokenizer_val_psnr"],
                        "tokenizer/val_still_share": summary["tokenizer_val_flicker"]["still_share"]},
                       offsets[stage] + stage_steps[stage])
        elif stage == "latent_actions":
            summary["latent_actions_val"] = latent_actions_val(latent, val_episodes, int(cfg.train.seed))
            logger.log({f"latent_actions/val_{k}": v for k, v in summary["latent_actions_val"].items()},
                       offsets[stage] + stage_steps[stage])
        elif stage == "dynamics":
            if episodes[0].tokens is None:
                tokenize_episodes(tokenizer, episodes + val_episodes, show_progress=show)
            val_sampler = ClipSampler(val_episodes, dyn_cfg.max_frames)
            summary["dynamics_val"] = dynamics_eval(dynamics, val_sampler, np.random.default_rng(1))
            logger.log({f"dynamics/val_{k}": v for k, v in summary["dynamics_val"].items()},
                       offsets[stage] + stage_steps[stage])
        else:
            if val_episodes[0].tokens is None:
                tokenize_episodes(tokenizer, episodes + val_episodes, show_progress=show)
            from worldmodel.success import calibrate_episode_threshold, episode_metrics

            detector.eval()
            summary["detector_threshold"] = calibrate_episode_threshold(
                detector, det_data["cal_tokens"], np.array([y.any() for y in det_data["cal_labels"]]),
                det_data["cal_states"], det_data["cal_references"])
            summary["detector_calibration"] = episode_metrics(detector, det_data["cal_tokens"], det_data["cal_labels"],
                                                              det_data["cal_states"], det_data["cal_references"])
            summary["detector_val"] = detector_val(dynamics, detector, val_episodes, int(cfg.train.seed) + 2)
            logger.log({f"detector/val_{k}": v for k, v in summary["detector_val"].items()},
                       offsets[stage] + stage_steps[stage])

    summary["seconds"] = round(time.time() - started, 1)
    world = WorldModel(tokenizer, dynamics, detector, statistics, statistics_key,
                       info={"train_summary": summary}, latent_actions=latent)
    final = world.save_pretrained(run_dir / "worldmodel")
    (final / "train_summary.json").write_text(json.dumps(summary, indent=2))
    logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    logger.finish()
    summary["worldmodel_dir"] = str(final)
    return summary


def trained_stages(cfg: DictConfig) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The stages this run trains, and the parts it takes from `init_from` instead (loaded)."""
    from worldmodel.dynamics import DynamicsModel
    from worldmodel.latent_actions import LatentActionModel
    from worldmodel.success import SuccessDetector
    from worldmodel.tokenizer import FrameTokenizer

    stages = [str(s) for s in (cfg.get("stages") or DEFAULT_STAGES)]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in stages={stages}; valid: {', '.join(STAGES)}")
    stages = tuple(s for s in STAGES if s in stages)
    kept = [s for s in STAGES if s not in stages]
    required = [s for s in kept if s not in OPTIONAL]
    source = cfg.get("init_from")
    if not source:
        if required:
            raise ValueError(f"stages={list(stages)} leaves out {required}: pass init_from=<a saved world model "
                             "directory> to take those parts from")
        return stages, {}
    source = Path(str(source))
    classes = {"tokenizer": FrameTokenizer, "latent_actions": LatentActionModel, "dynamics": DynamicsModel,
               "detector": SuccessDetector}
    loaded = {}
    for stage in kept:
        folder = FOLDERS[stage]
        if not (source / folder).is_dir():
            if stage in OPTIONAL:  # a world model may lack a detector or a latent action model; the run then saves none
                continue
            raise FileNotFoundError(f"init_from={source}: no {folder}/ to take the {stage} from "
                                    f"(expected a train_worldmodel output's worldmodel/ directory)")
        loaded[stage] = classes[stage].from_pretrained(source / folder)
    if not loaded:
        absent = f" (and {source} has none of the optional {kept})" if kept else ""
        raise ValueError(f"init_from={source} is used only for the parts that stages= leaves out, and "
                         f"stages={list(stages)} trains all of them{absent}")
    return stages, loaded


def save_run_checkpoint(run_dir, global_step, models, stage, stage_step, optimizer, scheduler, rng, keep_last,
                        logger) -> Path:
    upto = STAGES.index(stage)

    def write(tmp: Path) -> None:
        for name in STAGES[: upto + 1]:
            if models[name] is not None:
                models[name].save_pretrained(tmp / name)
        save_training_state(tmp, {stage: optimizer}, {stage: scheduler}, stage=stage, stage_step=stage_step,
                            global_step=global_step, data_rng=rng.bit_generator.state,
                            wandb_id=logger.run.id if logger.run is not None else None)

    return save_checkpoint(run_dir / CHECKPOINT_DIR, global_step, write, keep_last)


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    value = cfg.resume
    if value in (False, None, "false", ""):
        return None
    if value is True or value == "true":
        return latest_checkpoint(run_dir / CHECKPOINT_DIR)
    path = Path(str(value))
    if (path / CHECKPOINT_DIR).is_dir():
        path = latest_checkpoint(path / CHECKPOINT_DIR) or path
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"resume={value}: {path} is not a world-model training checkpoint "
                                "(no trainer_state.pt)")
    return path


def _main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir
    summary = train(cfg, output_dir)
    print(json.dumps({k: v for k, v in summary.items() if k != "datasets"}, indent=2))
    print(f"[train_worldmodel] wrote the world model to {summary['worldmodel_dir']} "
          f"(checkpoints, metrics.jsonl and wandb files in {output_dir})")
    return summary


def main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path="conf", config_name="train_worldmodel")(_main)()


if __name__ == "__main__":
    main()
