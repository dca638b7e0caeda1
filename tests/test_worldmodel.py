"""World model: tokenizer, dynamics (both decoders), success detector, ImaginedEnv, metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worldmodel.dynamics import DynamicsModel, Rollout
from worldmodel.metrics import bootstrap_agreement, mmrv, pearson, psnr, ssim, task_agreement
from worldmodel.model import WorldModel
from worldmodel.success import SuccessDetector, SuccessDetectorConfig
from worldmodel.tokenizer import FSQ, FrameTokenizer, TokenizerConfig
from worldmodel_helpers import SIZE, TOK
from worldmodel_helpers import dyn_config as _dyn_config
from worldmodel_helpers import tiny_world as _world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fsq_indices_round_trip():
    fsq = FSQ((8, 5, 5, 5))
    indices = torch.arange(1000)
    codes = fsq.indices_to_codes(indices)
    assert codes.abs().max() <= 1
    half = torch.div(fsq.levels, 2, rounding_mode="floor")
    assert torch.equal(fsq.codes_to_indices(codes * half), indices)


def test_tokenizer_round_trip_on_sim_frames_beats_threshold(trained_tokenizer):
    tok, frames = trained_tokenizer
    tokens = tok.encode(frames)
    assert tokens.shape == (len(frames), TOK.grid, TOK.grid)
    assert tokens.min() >= 0 and tokens.max() < TOK.codebook_size
    recon = (tok.decode(tokens).numpy() * 255).round().astype(np.uint8)
    mean_frame = np.broadcast_to(frames.mean(0).round().astype(np.uint8), frames.shape)
    recon_psnr, baseline_psnr = psnr(recon, frames).mean(), psnr(mean_frame, frames).mean()
    print(f"tokenizer round trip {recon_psnr:.2f} dB, mean-frame baseline {baseline_psnr:.2f} dB")
    assert recon_psnr > 20.0, recon_psnr
    assert recon_psnr > baseline_psnr + 3, (recon_psnr, baseline_psnr)


def test_tokenizer_resizes_other_frame_sizes_and_refuses_bad_input():
    tok = FrameTokenizer(TOK)
    frames = np.zeros((2, 48, 48, 3), np.uint8)
    assert tok.encode(frames).shape == (2, TOK.grid, TOK.grid)
    with pytest.raises(ValueError, match=r"uint8"):
        tok.encode(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\).*32x32x3"):
        tok.encode(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 80\)"):
        tok.decode(torch.full((1, TOK.grid, TOK.grid), 80))


def test_dynamics_overfits_a_few_episodes(trained_tokenizer, sim_episodes):
    tok, _ = trained_tokenizer
    torch.manual_seed(0)
    clips = [(tok.encode(imgs[:4]).reshape(4, -1), torch.from_numpy(acts[:4] / 0.05).clamp(-1, 1),
              torch.from_numpy(states[:4] - states[:1]) * 20) for imgs, acts, states in sim_episodes]
    tokens = torch.stack([c[0] for c in clips])
    actions = torch.stack([c[1] for c in clips]).float()
    states = torch.stack([c[2] for c in clips]).float()  # normalized: relative to the start, in 5 cm units
    model = DynamicsModel(_dyn_config(dim=48, state_dim=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(120):
        loss, metrics = model.loss(tokens, actions, gen, states=states)
        first = first if first is not None else metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert metrics["token_loss"] < 0.25 * first["token_loss"], (first, metrics)
    assert metrics["state_mse"] < 0.1 * first["state_mse"], (first, metrics)
    # decoding the memorized clips frame by frame from a clean context reproduces them: state first
    # (from frame 0's summary, its state and the action), then the frame conditioned on it
    cache, summary = model.encode_context(tokens[:, :1], None, states[:, :1])
    state = model.predict_state(summary, states[:, 0], actions[:, 0])
    assert (state - states[:, 1]).pow(2).mean() < 0.1 * first["state_mse"]
    predicted = model.decode_frame(cache, actions[:, 0], 1, "maskgit", steps=4, temperature=0.0, state=state)
    assert (predicted == tokens[:, 1]).float().mean() > 0.9
    with pytest.raises(ValueError, match=r"imagines the robot state \(state_dim=8\): give the context"):
        model.encode_context(tokens[:, :1], None)


def test_both_decoders_produce_valid_token_grids_and_maskgit_is_seeded():
    torch.manual_seed(0)
    model = DynamicsModel(_dyn_config()).eval()
    n = model.config.num_tokens
    context = torch.randint(0, model.config.codebook_size, (2, 2, n))
    actions = torch.randn(2, 1, 7)
    cache, _ = model.encode_context(context, actions)
    action = torch.randn(2, 7)
    for method, steps in (("maskgit", 1), ("maskgit", 6), ("autoregressive", None)):
        out = model.decode_frame(cache, action, 2, method, steps=steps or 1, sample_temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, n) and out.dtype == torch.long
        assert out.min() >= 0 and out.max() < model.config.codebook_size  # never the [MASK] id
    runs = [model.decode_frame(cache, action, 2, "maskgit", steps=6, temperature=2.0, sample_temperature=1.0,
                               generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="unknown decoding method 'beam'"):
        model.decode_frame(cache, action, 2, "beam")


def test_wrong_action_dimension_is_named():
    model = DynamicsModel(_dyn_config()).eval()
    cache, _ = model.encode_context(torch.zeros(1, 1, model.config.num_tokens, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"action must have dimension 7 .*got shape \(1, 6\)"):
        model.decode_frame(cache, torch.zeros(1, 6), 1)


def test_rollout_longer_than_context_slides_its_window():
    model = DynamicsModel(_dyn_config(max_frames=4)).eval()
    rollout = Rollout(model, torch.zeros(1, 1, model.config.num_tokens, dtype=torch.long), steps=2)
    for _ in range(9):
        tokens = rollout.step(torch.zeros(1, 7))
        assert tokens.shape == (1, model.config.num_tokens)
        assert len(rollout.frames) <= model.config.max_frames - 1
        assert len(rollout.actions) == len(rollout.frames) - 1
        assert rollout.cache[0][0].shape[-2] == len(rollout.frames)
    with pytest.raises(ValueError, match="longer than the model's context max_frames=4"):
        model(torch.zeros(1, 5, model.config.num_tokens, dtype=torch.long), torch.zeros(1, 5, 7),
              torch.zeros(1, 5, model.config.num_tokens, dtype=torch.bool))


def test_world_model_round_trip_and_tokenizer_mismatch(tmp_path):
    world = _world()
    path = world.save_pretrained(tmp_path / "wm")
    loaded = WorldModel.from_pretrained(path)
    for a, b in zip(world.dynamics.state_dict().values(), loaded.dynamics.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.statistics_key == "sim"
    other = FrameTokenizer(TokenizerConfig(image_size=SIZE, downsample=4, levels=(8, 5, 5, 5), channels=8))
    other.save_pretrained(path / "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer does not match the dynamics model \(levels: dynamics expects "
                                         r"\[5, 4, 4\], .* has \[8, 5, 5, 5\], codebook_size"):
        WorldModel.from_pretrained(path)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic saves leave no temporary directory
    config_file = path / "tokenizer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chanels": 8}))
    with pytest.raises(ValueError, match=rf"{config_file}: unknown TokenizerConfig key\(s\) \['chanels'\]; "
                                         "valid: channels, downsample"):
        WorldModel.from_pretrained(path)


def test_imagined_env_passes_check_env_and_validates_actions():
    from gymnasium.utils.env_checker import check_env

    from worldmodel.env import ImaginedEnv

    import envs

    torch.manual_seed(0)
    for state_dim in (0, 8):
        world = _world(state_dim=state_dim, reference_frame=bool(state_dim), spatial_state=bool(state_dim))
        env = ImaginedEnv(world, task="ReachTarget", backend="pybullet", randomization="none", steps=2,
                          max_episode_steps=5)
        check_env(env, skip_render_check=True)
        obs, info = env.reset(seed=3)
        assert obs["image"].shape == (SIZE, SIZE, 3) and obs["instruction"].startswith("reach")
        obs2, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))
        assert obs2["image"].dtype == np.uint8 and info["steps"] == 1
        with pytest.raises(ValueError, match=r"action must have shape \(7,\)"):
            env.step(np.zeros(6))
        env.close()
    # with states, reset gives the simulator's real state and each step an imagined one in its space
    assert set(obs) == {"image", "state", "instruction"}
    sim = envs.make_env("ReachTarget", backend="pybullet", randomization="none", image_size=SIZE)
    real, _ = sim.reset(seed=3)
    sim.close()
    env.reset(seed=3)
    np.testing.assert_array_equal(env.reset(seed=3)[0]["state"], real["state"])
    assert env.observation_space["state"].contains(env.step(np.zeros(7, np.float32))[0]["state"])
    env.close()


def test_pearson_and_mmrv_match_hand_computed_values():
    real = [0.1, 0.5, 0.9, 0.3]
    sim = [0.2, 0.4, 0.8, 0.6]
    # by hand: deviations real (-.35, .05, .45, -.15), sim (-.3, -.1, .3, .1); cross sum .22,
    # squares .35 and .2, so r = .22 / sqrt(.35 * .2) = 0.8315
    assert pearson(sim, real) == pytest.approx(0.22 / np.sqrt(0.35 * 0.2), abs=1e-9)
    assert pearson(sim, real) == pytest.approx(0.8315, abs=1e-4)
    # orderings disagree only for the pair (policy 2, policy 4): real 0.5 > 0.3 but sim 0.4 < 0.6,
    # so policies 2 and 4 each get a violation of |0.5 - 0.3| = 0.2: MMRV = (0 + 0.2 + 0 + 0.2) / 4
    assert mmrv(sim, real) == pytest.approx(0.1)
    assert mmrv(real, real) == 0.0
    with pytest.raises(ValueError, match="constant"):
        pearson([0.5, 0.5], [0.1, 0.2])


def test_bootstrap_intervals_of_r_and_mmrv():
    # one episode per policy: every resample is the data itself, so both intervals shrink to the values.
    # By hand: imagined (1, 0, 0), simulated (1, 1, 0): deviations (2/3, -1/3, -1/3) and (1/3, 1/3, -2/3),
    # cross sum 1/3, squares 2/3 each, r = 0.5; only policy 3 is ordered wrongly against policy 2 (0 = 0
    # imagined, 0 < 1 simulated), a violation of 1: MMRV = 1/3
    single = [([True], [True]), ([False], [True]), ([False], [False])]
    out = bootstrap_agreement(single, resamples=50)
    assert out["pearson_interval"] == pytest.approx([0.5, 0.5]) and out["mmrv_interval"] == pytest.approx([1 / 3] * 2)
    # imagined = simulated on every episode: each resample ranks the policies alike (r = 1, MMRV = 0)
    rng = np.random.default_rng(0)
    same = [(o, o) for o in (rng.random(40) < p for p in (0.9, 0.5, 0.1))]
    out = bootstrap_agreement(same, resamples=200)
    assert out["pearson_interval"] == pytest.approx([1.0, 1.0]) and out["mmrv_interval"] == [0.0, 0.0]
    # an imagined column unrelated to the simulated one: the interval spans zero, and is reproducible
    unrelated = [(rng.random(40) < 0.5, o) for _, o in same]
    out = bootstrap_agreement(unrelated, resamples=500, seed=3)
    assert out["pearson_interval"][0] < 0 < out["pearson_interval"][1]
    assert bootstrap_agreement(unrelated, resamples=500, seed=3) == out
    with pytest.raises(ValueError, match="policy 1: imagined and simulated outcomes must be two equal"):
        bootstrap_agreement([([True], [True]), ([True, False], [True])])
    with pytest.raises(ValueError, match="at least 2 policies"):
        bootstrap_agreement(single[:1])


def test_task_agreement_finds_the_task_that_is_ranked_wrong():
    # two tasks, three policies: A is imagined exactly as simulated, B upside down; pooled over both tasks
    # the rates would still rank the policies in order (B's errors are smaller than A's spread)
    def episodes(task, imagined, simulated):
        return [{"task": task, "success": i, "sim_success": s} for i, s in zip(imagined, simulated)]

    policies = [episodes("A", [1, 1, 1, 1], [1, 1, 1, 1]) + episodes("B", [0, 0], [1, 1]),
                episodes("A", [1, 1, 0, 0], [1, 1, 0, 0]) + episodes("B", [1, 0], [1, 0]),
                episodes("A", [0, 0, 0, 0], [0, 0, 0, 0]) + episodes("B", [1, 1], [0, 0])]
    out = task_agreement(policies)
    assert out["tasks"]["A"] == {"imagined": [1.0, 0.5, 0.0], "sim": [1.0, 0.5, 0.0], "pearson": pytest.approx(1.0),
                                 "mmrv": 0.0}
    assert out["tasks"]["B"]["pearson"] == pytest.approx(-1.0)
    assert out["tasks"]["B"]["mmrv"] == pytest.approx((1 + 0.5 + 1) / 3)  # every pair is ordered wrongly
    assert out["mean_pearson"] == pytest.approx(0.0) and out["mean_mmrv"] == pytest.approx(5 / 12)
    pooled = [np.mean([e["success"] for e in p]) for p in policies], [np.mean([e["sim_success"] for e in p])
                                                                      for p in policies]
    assert pearson(*pooled) > 0.9
    constant = [episodes("A", [1], [1]), episodes("A", [1], [0])]  # imagined rates equal: r undefined
    assert np.isnan(task_agreement(constant)["tasks"]["A"]["pearson"])
    with pytest.raises(ValueError, match="policy 0 has no episode of task 'A'"):
        task_agreement([episodes("B", [1], [1]), episodes("A", [1], [1])])


def test_ssim_and_psnr_sanity():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    assert np.allclose(ssim(a, a), 1.0)
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert (ssim(noisy, a) < 0.99).all()
    assert (psnr(noisy, a) > 20).all() and (psnr(a, a) >= 99).all()


@pytest.mark.parametrize("state_dim", [0, 8])
def test_eval_in_imagination_writes_the_results_schema_and_side_by_side_videos(tmp_path, state_dim):
    import json

    from embodied.evaluation import EvalConfig, ScriptedPolicy
    from worldmodel.evaluate import evaluate_in_imagination

    torch.manual_seed(0)
    cfg = EvalConfig(backend="pybullet", episodes_per_task=1, tasks=["ReachTarget"], num_envs=1, image_size=SIZE,
                     randomization="none", videos_per_task=1)
    world = _world(state_dim=state_dim, reference_frame=bool(state_dim), spatial_state=bool(state_dim))
    results = evaluate_in_imagination(ScriptedPolicy(), cfg, tmp_path, world, steps=2, show_progress=False)
    assert results["policy"] == "scripted (imagined)"
    assert set(results) >= {"suite", "backend", "policy", "seed", "tasks", "overall", "versions"}
    assert results["tasks"]["ReachTarget"]["episodes"] == 1
    sim = json.loads((tmp_path / "sim" / "results.json").read_text())
    assert sim["tasks"]["ReachTarget"]["success_rate"] == 1.0  # the expert succeeds in the simulator
    episode = json.loads((tmp_path / "episodes.jsonl").read_text().splitlines()[0])
    assert episode["sim_success"] is True and episode["length"] <= episode["sim_length"]
    assert (tmp_path / "videos" / "ReachTarget_ep000_imagined_vs_sim.mp4").stat().st_size > 0
    assert set(json.loads((tmp_path / "agreement.json").read_text())["tasks"]) == {"ReachTarget"}


def test_several_world_models_judge_one_simulated_run(tmp_path):
    # e.g. training seeds: the simulator runs once, and each world model writes its own verdicts
    import copy
    import json

    from embodied.evaluation import EvalConfig, ScriptedPolicy
    from worldmodel.evaluate import evaluate_in_imaginations

    torch.manual_seed(0)
    cfg = EvalConfig(backend="pybullet", episodes_per_task=2, tasks=["ReachTarget"], num_envs=1, image_size=SIZE,
                     randomization="none", videos_per_task=0)
    eager = _world()
    eager.detector.config.threshold = 1e-6  # fires on the first imagined frame
    strict = copy.deepcopy(eager)
    strict.detector.config.threshold = 1.0  # never fires
    results = evaluate_in_imaginations(ScriptedPolicy(), cfg, [tmp_path / "a", tmp_path / "b"], [eager, strict],
                                       steps=2, show_progress=False)
    assert [r["overall"]["success_rate"] for r in results] == [1.0, 0.0]
    sims = [(tmp_path / d / "sim" / "episodes.jsonl").read_text() for d in "ab"]
    assert sims[0] == sims[1] and all(json.loads(x)["success"] for x in sims[0].splitlines())
    with pytest.raises(ValueError, match="2 world models but 1 output dirs"):
        evaluate_in_imaginations(ScriptedPolicy(), cfg, [tmp_path / "c"], [eager, strict], show_progress=False)


def test_detector_threshold_is_chosen_per_episode(tmp_path):
    from worldmodel.success import calibrate_episode_threshold, episode_metrics

    torch.manual_seed(0)
    det = SuccessDetector(SuccessDetectorConfig(codebook_size=8, grid=4, embed_dim=4, channels=8))
    with torch.no_grad():  # score = sigmoid(number of token-7 cells): frames full of 7s look "done"
        for p in det.parameters():
            p.zero_()
        det.embed.weight[7, 0] = 1.0
        det.conv[0].weight[0, 0, 1, 1] = 1.0
        det.conv[2].weight[0, 0, 1, 1] = 1.0
        det.conv[4].weight[0, 0, 1, 1] = 1.0
        det.head[0].weight[0, 0] = 1.0
        det.head[2].weight[0, 0] = 40.0
        det.head[2].bias.fill_(-2.0)
    rng = np.random.default_rng(0)
    episodes, labels = [], []
    for i in range(40):  # long failures with a frame a quarter 7s (score 0.79), successes ending all 7s (0.99)
        frames = rng.integers(0, 7, (30 if i % 2 else 8, 16))
        y = np.zeros(len(frames), bool)
        if i % 2:
            frames[rng.integers(len(frames)), :4] = 7
        else:
            frames[-1] = 7
            y[-1] = True
        episodes.append(frames)
        labels.append(y)
    successes = np.array([y.any() for y in labels])
    assert episode_metrics(det, episodes, labels)["episode_balanced_accuracy"] == 0.5  # at 0.5 every episode fires
    threshold = calibrate_episode_threshold(det, episodes, successes)
    assert 0.5 < threshold < 1 and det.config.threshold == threshold
    metrics = episode_metrics(det, episodes, labels)
    assert metrics["episode_balanced_accuracy"] == 1.0 and metrics["frame_recall"] == 1.0
    det.save_pretrained(tmp_path)
    assert SuccessDetector.from_pretrained(tmp_path).config.threshold == threshold
    with pytest.raises(ValueError, match="3 episodes but 2 success labels"):
        calibrate_episode_threshold(det, episodes[:3], successes[:2])


def test_a_detector_with_the_reference_frame_learns_what_only_the_first_frame_shows():
    # success = the arm (token 6) is on the cell where the episode's first frame showed the target (token 7),
    # which the later frames no longer show: only a detector that reads the reference frame can tell
    from worldmodel.success import episode_scores

    rng = np.random.default_rng(0)

    def examples(n):
        references = rng.integers(0, 6, (n, 16))
        target = rng.integers(0, 16, n)
        references[np.arange(n), target] = 7
        frames = rng.integers(0, 6, (n, 16))
        labels = rng.random(n) < 0.5
        arm = np.where(labels, target, (target + rng.integers(1, 16, n)) % 16)
        frames[np.arange(n), arm] = 6
        return torch.from_numpy(frames), torch.from_numpy(references), torch.from_numpy(labels)

    frames, references, labels = examples(4096)
    test_frames, test_references, test_labels = examples(512)
    accuracy = {}
    for reference_frame in (False, True):
        torch.manual_seed(0)
        det = SuccessDetector(SuccessDetectorConfig(codebook_size=8, grid=4, embed_dim=8, channels=32,
                                                    reference_frame=reference_frame))
        optimizer = torch.optim.Adam(det.parameters(), lr=3e-3)
        for step in range(300):
            idx = torch.from_numpy(rng.integers(0, len(frames), 128))
            loss, _ = det.loss(frames[idx], labels[idx], references=references[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        predicted = det.predict(test_frames, references=test_references)
        accuracy[reference_frame] = (predicted == test_labels).float().mean().item()
    assert accuracy[True] > 0.9 and accuracy[False] < 0.65, accuracy
    with pytest.raises(ValueError, match=r"reads each frame's reference frame \(reference_frame=true\)"):
        det(test_frames[:2])
    with pytest.raises(ValueError, match="give episode_references, one per episode \\(2\\)"):
        episode_scores(det, [test_frames[:3].numpy(), test_frames[3:5].numpy()])
    scores = episode_scores(det, [test_frames[:3].numpy()], episode_references=[test_references[0].numpy()])
    np.testing.assert_allclose(scores[0], det.scores(test_frames[:3], references=test_references[[0, 0, 0]]),
                               atol=1e-6)


def test_imagine_episodes_matches_one_rollout_per_episode():
    from worldmodel.data import Episode
    from worldmodel.dynamics import Rollout
    from worldmodel.rollouts import imagine_episodes

    torch.manual_seed(0)
    dyn = DynamicsModel(_dyn_config()).eval()
    rng = np.random.default_rng(0)
    n = TOK.grid ** 2
    episodes = []
    for length in (3, 6, 2):
        actions = rng.uniform(-1, 1, (length, 7)).astype(np.float32)
        episodes.append(Episode("sim", np.zeros((length, SIZE, SIZE, 3), np.uint8), actions, actions,
                                np.zeros(length, np.float32), "x", rng.integers(0, TOK.codebook_size, (length, n))))
    batched, states = imagine_episodes(dyn, episodes, "maskgit", 2, seed=0, temperature=0.0, batch_size=8)
    assert [b.shape for b in batched] == [(3, n), (6, n), (2, n)] and states == [None] * 3
    for ep, frames in zip(episodes, batched):  # argmax decoding: padding a batch changes nothing
        roll = Rollout(dyn, torch.from_numpy(ep.tokens[:1].astype(np.int64))[:, None], None, "maskgit", 2,
                       temperature=0.0)
        alone = np.stack([roll.step(torch.from_numpy(a[None]))[0].numpy() for a in ep.actions_norm])
        assert np.array_equal(alone, frames)
    ep = episodes[0]
    ep.tokens = None
    with pytest.raises(ValueError, match="episode 0 .* is not tokenized"):
        imagine_episodes(dyn, [ep])


def test_detector_with_states_reads_them():
    torch.manual_seed(0)
    det = SuccessDetector(SuccessDetectorConfig(codebook_size=8, grid=4, embed_dim=4, channels=8, state_dim=8))
    tokens = torch.randint(0, 8, (3, 16))
    states = torch.randn(3, 8)
    assert not torch.equal(det(tokens, states), det(tokens, states + 1))  # the state changes the score
    with pytest.raises(ValueError, match=r"reads the robot state \(state_dim=8\); got None"):
        det(tokens)


def test_a_spatial_detector_compares_the_gripper_state_with_where_the_target_is():
    # success = the gripper (its state: the cell's coordinates in [-1, 1]) is within 2 cells of the target that
    # the reference frame shows. Convolutions pooled over the grid cannot tell where the target is; with each
    # cell's coordinates and their products with the state at every cell (spatial_state) they can
    g = 8

    def examples(rng, n):
        references = np.zeros((n, g, g), np.int64)
        ty, tx, gy, gx = (rng.integers(0, g, n) for _ in range(4))
        references[np.arange(n), ty, tx] = 1
        states = np.zeros((n, 8), np.float32)
        states[:, 0], states[:, 1] = gy / (g - 1) * 2 - 1, gx / (g - 1) * 2 - 1
        labels = (np.abs(gy - ty) <= 2) & (np.abs(gx - tx) <= 2)
        return torch.from_numpy(references.reshape(n, -1)), torch.from_numpy(states), torch.from_numpy(labels)

    test_references, test_states, test_labels = examples(np.random.default_rng(1), 2000)
    balanced = {}
    for spatial in (False, True):
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        det = SuccessDetector(SuccessDetectorConfig(codebook_size=2, grid=g, embed_dim=8, channels=16, state_dim=8,
                                                    reference_frame=True, spatial_state=spatial))
        optimizer = torch.optim.AdamW(det.parameters(), lr=1e-2)
        for _ in range(300):
            references, states, labels = examples(rng, 128)
            loss, _ = det.loss(torch.zeros_like(references), labels, pos_weight=2.7, states=states,
                               references=references)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        predicted = det.predict(torch.zeros_like(test_references), test_states, test_references)
        balanced[spatial] = ((predicted[test_labels].float().mean() + (~predicted[~test_labels]).float().mean()) / 2).item()
    assert balanced[True] > 0.85 and balanced[False] < 0.7, balanced
    with pytest.raises(ValueError, match=r"spatial_state=true needs a detector that reads the robot state"):
        SuccessDetector(SuccessDetectorConfig(codebook_size=2, grid=g, spatial_state=True))


def test_a_proprio_policy_runs_closed_loop_in_imagination():
    """The imagined state is what lets a policy with a proprio token act inside ImaginedEnv."""
    from policy_helpers import tiny

    from policies.openvla import OpenVLAPolicy
    from worldmodel.env import ImaginedEnv

    policy = tiny(OpenVLAPolicy, use_proprio=True, decoding="parallel", action_chunk=2).eval()
    torch.manual_seed(0)
    env = ImaginedEnv(_world(state_dim=8), task="ReachTarget", backend="pybullet", randomization="none", steps=2,
                      max_episode_steps=4)
    obs, _ = env.reset(seed=1)
    states = [obs["state"]]
    for _ in range(3):
        obs, *_ = env.step(policy.select_action(obs, obs["instruction"]))
        states.append(obs["state"])
    env.close()
    assert not np.allclose(states[0], states[-1])  # the imagined state moves with the actions
    blind = ImaginedEnv(_world(state_dim=0), task="ReachTarget", backend="pybullet", randomization="none", steps=2)
    obs, _ = blind.reset(seed=1)
    blind.close()
    with pytest.raises(KeyError, match="has no 'state' key"):
        policy.predict_action(obs, obs["instruction"])
