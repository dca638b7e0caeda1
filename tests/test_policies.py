"""OpenVLA and RT-2 policies on tiny configs: action tokens, overfitting, decoding, checkpoints, bad input."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import policies
from embodied.evaluation import CheckpointPolicy as EvalCheckpointPolicy
from embodied.policy_loader import CheckpointPolicy as LoaderCheckpointPolicy
from embodied.data.statistics import compute_statistics, normalize, unnormalize
from policies import ActionTokenizer, OpenVLAPolicy, RT2Policy
from policies.action_chunks import ActionChunkQueue
from policies.openvla import gripper_commands
from policy_helpers import single_thread, IMAGE, batch, observations, statistics, tiny, train_steps, train_until_exact  # noqa: F401 (autouse fixture)


# -- action tokens ---------------------------------------------------------------------------------

def test_action_tokens_round_trip_within_half_a_bin_on_the_last_256_ids():
    tok = ActionTokenizer(vocab_size=32000)
    x = np.concatenate([np.linspace(-1, 1, 5001), [-1.0, 1.0, -1.5, 2.0]]).astype(np.float32).reshape(-1, 7)
    ids = tok.encode(x)
    assert ids.min() == 32000 - 256 and ids.max() == 32000 - 1  # exactly the last 256 ids, all used
    assert len(np.unique(ids)) == 256
    error = np.abs(tok.decode(ids) - np.clip(x, -1, 1))
    assert error.max() <= tok.bin_width / 2 + 1e-6
    # the torch path is the same map
    assert torch.equal(tok.encode(torch.from_numpy(x)), torch.from_numpy(ids))
    assert np.allclose(tok.decode(torch.from_numpy(ids)).numpy(), tok.decode(ids))
    # OpenVLA's formula: id = vocab_size - digitize(x, linspace(-1, 1, 256))
    assert np.array_equal(ids, 32000 - np.digitize(np.clip(x, -1, 1), np.linspace(-1, 1, 256)))


def test_raw_actions_round_trip_through_statistics_and_tokens():
    stats = statistics()["sim_tabletop10"]["action"]
    tok = ActionTokenizer(1024)
    rng = np.random.default_rng(1)
    raw = rng.uniform(stats["q01"], stats["q99"], size=(200, 7)).astype(np.float32)
    raw[:, -1] = rng.integers(0, 2, 200)  # the gripper is not normalized (mask)
    back = unnormalize(tok.decode(tok.encode(normalize(raw, stats))), stats)
    half_bin = tok.bin_width / 2 * (np.asarray(stats["q99"]) - np.asarray(stats["q01"])) / 2
    half_bin[-1] = tok.bin_width / 2
    assert np.all(np.abs(back - raw) <= half_bin + 1e-6)


def test_tiny_tokenizer_text_never_uses_action_ids():
    from policies.tiny_tokenizer import build_tiny_tokenizer, corpus

    tokenizer = build_tiny_tokenizer()
    first_action_id = ActionTokenizer(tokenizer.vocab_size).first_id
    texts = corpus() + ["Zebra crossing ☃ 123 xylophone", "In: What action should the robot take to fly?\nOut:"]
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    assert max(ids) < first_action_id
    assert tokenizer.decode(tokenizer("pick up the red cube", add_special_tokens=False)["input_ids"]) \
        == "pick up the red cube"


# -- training and decoding ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_openvla():
    policy = tiny(OpenVLAPolicy)
    data = batch()
    metrics = train_until_exact(policy, data)
    return policy, data, metrics


def expected_actions(policy, data):
    """The batch's actions after the token round trip, un-normalized: what a perfect policy returns."""
    tok = policy.processor.action_tokenizer
    normalized = tok.decode(tok.encode(data["action"].numpy()))
    return policy.processor.unnormalize_actions(normalized)


def test_openvla_overfits_a_batch_and_predicts_its_actions(trained_openvla):
    policy, data, metrics = trained_openvla
    assert metrics["action_accuracy"] == 1.0 and metrics["action_l1"] == 0.0
    assert len(policy.vision.towers) == 2 and policy.vision.num_patches == 16
    actions = policy.predict_actions(observations(data))
    assert actions.shape == (4, 1, 7) and actions.dtype == np.float32
    np.testing.assert_allclose(actions[:, 0], expected_actions(policy, data), atol=1e-6)
    single = policy.predict_action(observations(data)[1], data["instruction"][1])
    assert single.shape == (7,) and single.dtype == np.float32
    np.testing.assert_allclose(single, actions[1, 0], atol=1e-6)


def test_save_then_load_gives_identical_actions(trained_openvla, tmp_path):
    policy, data, _ = trained_openvla
    policy.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "dataset_statistics.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = policies.load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is OpenVLAPolicy
    assert loaded.config == policy.config
    assert np.array_equal(loaded.predict_actions(observations(data)), policy.predict_actions(observations(data)))
    with torch.no_grad():
        assert loaded(data)[0].item() == policy(data)[0].item()
    with pytest.raises(ValueError, match="'openvla' policy, not 'rt2'"):
        RT2Policy.from_pretrained(tmp_path / "ckpt")
    # the Hydra path: policy.pretrained=<dir> loads the checkpoint
    again = policies.make_policy({"name": "openvla", "pretrained": str(tmp_path / "ckpt"), "decoding": None,
                                  "binarize_gripper": None})
    assert np.array_equal(again.predict_actions(observations(data)), policy.predict_actions(observations(data)))
    # null keeps a checkpoint's own training and inference settings; a given value overrides them
    loaded.config.binarize_gripper, loaded.config.gripper_threshold, loaded.config.label_sigma_bins = True, 0.8, 3.0
    loaded.save_pretrained(tmp_path / "ckpt_set")
    kept = policies.make_policy({"name": "openvla", "pretrained": str(tmp_path / "ckpt_set"), "decoding": None,
                                 "binarize_gripper": None, "gripper_threshold": None, "label_sigma_bins": None}).config
    assert (kept.binarize_gripper, kept.gripper_threshold, kept.label_sigma_bins) == (True, 0.8, 3.0)
    given = policies.make_policy({"name": "openvla", "pretrained": str(tmp_path / "ckpt_set"),
                                  "binarize_gripper": False, "gripper_threshold": 0.5, "label_sigma_bins": 0.0}).config
    assert (given.binarize_gripper, given.gripper_threshold, given.label_sigma_bins) == (False, 0.5, 0.0)


def test_rt2_overfits_and_loads_as_rt2(tmp_path):
    policy = tiny(RT2Policy)
    assert list(policy.vision.towers) == ["siglip"] and isinstance(policy.projector, torch.nn.Linear)
    assert policy.processor.prompt("Open the drawer.") == "Q: What action should the robot take to open the drawer? A:"
    data = batch(seed=1)
    assert train_until_exact(policy, data)["action_accuracy"] == 1.0
    np.testing.assert_allclose(policy.predict_actions(observations(data))[:, 0], expected_actions(policy, data),
                               atol=1e-6)
    policy.save_pretrained(tmp_path)
    loaded = policies.load_pretrained(tmp_path)
    assert type(loaded) is RT2Policy
    assert np.array_equal(loaded.predict_actions(observations(data)), policy.predict_actions(observations(data)))


def test_parallel_chunk_decoding_overfits_with_masked_steps():
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=3)
    data = batch(chunk=3, seed=2)
    data["action_mask"][0, 2] = False  # past the episode's end: no loss there
    metrics = train_until_exact(policy, data)
    assert metrics["action_accuracy"] == 1.0
    actions = policy.predict_actions(observations(data))
    assert actions.shape == (4, 3, 7)
    expected = expected_actions(policy, data)
    mask = data["action_mask"].numpy()
    np.testing.assert_allclose(actions[mask], expected[mask], atol=1e-6)
    # the same weights decode autoregressively too (a different, untrained path: only shapes agree)
    assert policy.predict_actions(observations(data)[:1], decoding="autoregressive", num_actions=2).shape == (1, 2, 7)
    with pytest.raises(ValueError, match="parallel decoding predicts action_chunk=3 actions, not num_actions=2"):
        policy.predict_actions(observations(data)[:1], num_actions=2)
    # select_action executes a chunk open-loop before predicting again
    policy.reset()
    first = [policy.select_action(observations(data)[1]) for _ in range(3)]
    np.testing.assert_allclose(np.stack(first), actions[1], atol=1e-6)


def test_parallel_tokens_binarize_the_gripper_from_its_bin_distribution():
    # the argmax bin says open or closed; the distribution's mean says how sure: binarizing at a threshold
    # (and switching with hysteresis) needs the second, as a classifier's p(open)
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2)
    data = batch(chunk=2, seed=5)
    obs = observations(data)
    plain = policy.predict_actions(obs)
    inputs = policy.processor.from_observations(obs)
    tok = policy.processor.action_tokenizer
    with torch.no_grad():
        probs = tok.logits_to_bins(policy._slot_logits(inputs)).float().softmax(-1).reshape(4, 2, 7, -1)
    centres = tok.decode(torch.arange(tok.first_id, tok.vocab_size))
    gripper_mean = (probs[..., -1, :] * centres).sum(-1).numpy()
    expected_mean = policy.processor.unnormalize_actions(np.repeat(gripper_mean[..., None], 7, -1))[..., -1]
    assert np.abs(expected_mean - plain[..., -1]).max() > 1e-3  # an untrained policy: the mean is not the argmax
    for threshold in (0.3, 0.6):
        policy.config.binarize_gripper, policy.config.gripper_threshold = True, threshold
        snapped = policy.predict_actions(obs)
        np.testing.assert_array_equal(snapped[..., :6], plain[..., :6])  # the arm keeps its argmax bins
        np.testing.assert_array_equal(snapped[..., 6], (np.clip(expected_mean, 0, 1) > threshold).astype(np.float32))


def test_l1_head_regresses_continuous_actions_and_round_trips(tmp_path):
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=3, action_head="l1")
    data = batch(chunk=3, seed=2)
    data["action_mask"][0, 2] = False  # past the episode's end: no loss there
    first, metrics = train_steps(policy, data)
    assert metrics["loss"] == pytest.approx(metrics["action_l1"])  # the loss is the mean absolute error
    assert metrics["action_l1"] < 0.1 * first["action_l1"]
    # continuous predictions: finer than a bin, not snapped to bin centres
    actions = policy.predict_actions(observations(data))
    assert actions.shape == (4, 3, 7)
    mask = data["action_mask"].numpy()
    target = policy.processor.unnormalize_actions(data["action"].numpy())
    assert np.abs(actions[mask] - target[mask]).mean() < np.abs(target[mask]).mean() * 0.2
    centres = policy.processor.unnormalize_actions(policy.processor.action_tokenizer.bin_centers[:, None].repeat(7, 1))
    assert not np.isin(actions[..., 0], centres[:, 0]).all()
    policy.save_pretrained(tmp_path / "l1")
    loaded = policies.load_pretrained(tmp_path / "l1")
    assert loaded.config.action_head == "l1"
    np.testing.assert_array_equal(loaded.predict_actions(observations(data)), actions)
    # binarize_gripper snaps the regressed gripper command (last dim) to closed/open, and nothing else
    assert not np.isin(actions[..., 6], [0.0, 1.0]).all()
    loaded.config.binarize_gripper = True
    snapped = loaded.predict_actions(observations(data))
    np.testing.assert_array_equal(snapped[..., :6], actions[..., :6])
    np.testing.assert_array_equal(snapped[..., 6], (actions[..., 6] > 0.5).astype(np.float32))
    loaded.config.gripper_threshold = 0.3  # the threshold moves with the setting
    np.testing.assert_array_equal(loaded.predict_actions(observations(data))[..., 6],
                                  (actions[..., 6] > 0.3).astype(np.float32))
    # it has no tokens to decode, and it needs the parallel slots
    with pytest.raises(ValueError, match="cannot decode 'autoregressive'"):
        loaded.predict_actions(observations(data), decoding="autoregressive")
    with pytest.raises(ValueError, match="emits no action tokens"):
        loaded.predict_action_tokens(loaded.processor.from_observations(observations(data)))
    with pytest.raises(ValueError, match="needs decoding='parallel'"):
        tiny(OpenVLAPolicy, action_head="l1")
    with pytest.raises(ValueError, match="unknown action_head 'mse'; valid: tokens, l1"):
        tiny(OpenVLAPolicy, decoding="parallel", action_head="mse")


def test_l1_head_can_classify_the_gripper(tmp_path):
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1", classify_gripper=True)
    data = batch(chunk=2, seed=4)
    data["action"][..., -1] = (data["action"][..., -1] > 0).float()  # demonstrations open (1) or close (0) fully
    assert set(data["action"][..., -1].flatten().tolist()) == {0.0, 1.0}
    first, metrics = train_steps(policy, data)
    assert metrics["loss"] < 0.1 * first["loss"]  # the arm's L1 error plus the gripper's cross-entropy
    actions = policy.predict_actions(observations(data))
    # the gripper comes out fully open or closed, as demonstrated; the arm stays continuous
    np.testing.assert_array_equal(actions[..., 6], data["action"][..., 6].numpy())
    target = policy.processor.unnormalize_actions(data["action"].numpy())
    assert np.abs(actions[..., :6] - target[..., :6]).mean() < np.abs(target[..., :6]).mean() * 0.2
    policy.save_pretrained(tmp_path / "p")
    loaded = policies.load_pretrained(tmp_path / "p")
    assert loaded.config.classify_gripper
    np.testing.assert_array_equal(loaded.predict_actions(observations(data)), actions)
    # the gripper opens when p(open) > gripper_threshold: logits of p = 0.1, 0.5, 0.73, 0.95
    logits = torch.tensor([[0.0] * 6 + [v] for v in (-2.2, 0.0, 1.0, 3.0)])
    assert loaded._head_actions(logits)[:, 6].tolist() == [0, 0, 1, 1]
    wary = policies.load_pretrained(tmp_path / "p", gripper_threshold=0.9)  # e.g. `embodied.eval gripper_threshold=0.9`
    assert wary._head_actions(logits)[:, 6].tolist() == [0, 0, 0, 1]
    assert torch.equal(wary._head_actions(logits)[:, :6], logits[:, :6])
    with pytest.raises(ValueError, match=r"gripper_threshold must be in \(0, 1\), got 1.0"):
        policies.load_pretrained(tmp_path / "p", gripper_threshold=1.0)
    with pytest.raises(ValueError, match="classify_gripper splits the L1 head's output: it needs action_head='l1'"):
        tiny(OpenVLAPolicy, classify_gripper=True)
    # statistics that normalize the gripper: its normalized targets are no longer 0 (closed) and 1 (open)
    rng = np.random.default_rng(0)
    normalized_gripper = compute_statistics(rng.normal(size=(50, 7)), rng.normal(size=(50, 8)), 5, action_mask=[True] * 7)
    with pytest.raises(ValueError, match="classify_gripper needs the gripper .* statistics of 'scaled' normalize it"):
        loaded.processor.set_statistics({"scaled": normalized_gripper})


def test_per_dimension_loss_weights_and_regression_losses():
    data = batch(size=8, chunk=2, seed=5)
    plain = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1")
    loss, _ = plain(data)
    # weights scale each dimension's share of the loss; the stop token and the mask are untouched
    weighted = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1",
                    action_loss_weights=[2.0] * 7)
    torch.testing.assert_close(weighted(data)[0], 2 * loss)
    only_yaw = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1",
                    action_loss_weights=[0, 0, 0, 0, 0, 1, 0])
    with torch.no_grad():
        regressed = only_yaw._regress_actions(only_yaw.processor(data["image"], data["instruction"],
                                                                 actions=data["action"], decoding="parallel"))[0]
    torch.testing.assert_close(only_yaw(data)[0], (regressed[..., 5] - data["action"][..., 5]).abs().sum() / (8 * 2 * 7))
    squared = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1",
                   action_loss_weights=[0, 0, 0, 0, 0, 1, 0], regression_losses=["l1"] * 5 + ["mse", "l1"])
    torch.testing.assert_close(squared(data)[0], (regressed[..., 5] - data["action"][..., 5]).square().sum() / (8 * 2 * 7))
    # a label set on a quarter of the frames, that the input does not predict: L1 learns its median (0), the
    # squared loss its mean (0.25)
    rare = batch(size=8, chunk=2, seed=6)
    rare["image"][:] = rare["image"][:1]
    rare["instruction"] = [rare["instruction"][0]] * 8
    rare["action"][..., 5] = torch.tensor([1.0, 0, 0, 0, 1.0, 0, 0, 0])[:, None]
    predicted = {}
    for kind in ("l1", "mse"):
        policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1",
                      regression_losses=["l1"] * 5 + [kind, "l1"])
        train_steps(policy, rare, steps=150, lr=3e-3)
        with torch.no_grad():
            inputs = policy.processor(rare["image"][:1], rare["instruction"][:1], decoding="parallel")
            predicted[kind] = float(policy._regress_actions(inputs)[0][0, :, 5].mean())
    assert abs(predicted["l1"]) < 0.05 and abs(predicted["mse"] - 0.25) < 0.05, predicted
    with pytest.raises(ValueError, match=r"action_loss_weights must be 7 weights >= 0 .* got \[1, 1\]"):
        tiny(OpenVLAPolicy, action_loss_weights=[1, 1])
    with pytest.raises(ValueError, match="not all 0"):
        tiny(OpenVLAPolicy, action_loss_weights=[0] * 7)
    with pytest.raises(ValueError, match="regression_losses must be 7 of l1, mse"):
        tiny(OpenVLAPolicy, decoding="parallel", action_head="l1", regression_losses=["l1"] * 6 + ["huber"])
    with pytest.raises(ValueError, match="regression_losses choose the L1 head's loss per dimension: it needs"):
        tiny(OpenVLAPolicy, regression_losses=["mse"] * 7)


def test_gripper_switch_threshold_switches_from_the_current_command(tmp_path):
    # hand-computed, threshold 0.1: an open gripper closes once p(open) < 0.9, a closed one opens once
    # p(open) > 0.1, at most once per chunk
    score = np.array([[0.95, 0.85, 0.95, 0.2], [0.05, 0.12, 0.05, 0.9], [0.5, 0.5, 0.5, 0.5]])
    assert gripper_commands(score, [1, 0, 0], 0.1).tolist() == [[1, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]]
    assert gripper_commands(score, None, 0.1)[:, 0].tolist() == [1, 0, 0]  # no current command: open
    assert gripper_commands(score, [0, 0, 0], 0.6).tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"one per row \(3\), got shape \(2,\)"):
        gripper_commands(score, [1, 0], 0.1)

    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=3, n_action_steps=2, action_head="l1",
                  classify_gripper=True)
    with torch.no_grad():  # p(open) = 0.3 at every slot and observation
        policy.action_head.out[1].weight[-1] = 0.0
        policy.action_head.out[1].bias[-1] = float(np.log(0.3 / 0.7))
    obs = observations(batch(chunk=3))
    assert (policy.predict_actions(obs)[..., 6] == 0).all()  # gripper_threshold 0.5: closed
    policy.config.gripper_switch_threshold = 0.2  # p(closed) 0.7 and p(open) 0.3 both pass it
    assert policy.predict_actions(obs, gripper_state=[1, 0, 1, 0])[..., 6].tolist() == [[0] * 3, [1] * 3] * 2
    policy.config.gripper_switch_threshold = 0.4  # only p(closed) passes it: a closed gripper stays closed
    assert (policy.predict_actions(obs, gripper_state=[1, 0, 1, 0])[..., 6] == 0).all()
    policy.config.gripper_switch_threshold = 0.2

    # select_action carries its last command into each new chunk; reset() starts open again
    policy.reset()
    assert [policy.select_action(obs[0])[6] for _ in range(6)] == [0, 0, 1, 1, 0, 0]
    policy.reset()
    assert policy.select_action(obs[0])[6] == 0
    # the evaluation harness keeps one command per env, and a new episode in one env starts it open
    harness = EvalCheckpointPolicy(policy)
    envs = SimpleNamespace(num_envs=2)
    stacked = {"image": np.stack([o["image"] for o in obs[:2]]), "instruction": [o["instruction"] for o in obs[:2]]}
    harness.reset([0, 1])
    assert [harness.act(stacked, envs)[:, 6].tolist() for _ in range(2)] == [[0, 0], [0, 0]]
    harness.reset([1])
    assert [harness.act(stacked, envs)[:, 6].tolist() for _ in range(2)] == [[1, 0], [1, 0]]
    # deploy and serve run the chunks as evaluation does: n_action_steps=2 of each, then re-plan
    served = LoaderCheckpointPolicy(policy, "tiny")
    served.reset()
    assert [served.predict_action(obs[0])[6] for _ in range(6)] == [0, 0, 1, 1, 0, 0]
    served.reset()
    assert served.predict_action(obs[0])[6] == 0

    # saved with the checkpoint; null keeps it, a value overrides it
    policy.save_pretrained(tmp_path / "p")
    assert policies.load_pretrained(tmp_path / "p").config.gripper_switch_threshold == 0.2
    cfg = {"name": "openvla", "pretrained": str(tmp_path / "p"), "gripper_switch_threshold": None}
    assert policies.make_policy(cfg).config.gripper_switch_threshold == 0.2
    assert policies.make_policy({**cfg, "gripper_switch_threshold": 0.3}).config.gripper_switch_threshold == 0.3
    with pytest.raises(ValueError, match=r"gripper_switch_threshold must be in \(0, 1\) or None, got 1.5"):
        policies.load_pretrained(tmp_path / "p", gripper_switch_threshold=1.5)
    with pytest.raises(ValueError, match="gripper_switch_threshold switches a binary gripper: it needs classify_gripper"):
        tiny(OpenVLAPolicy, decoding="parallel", action_head="l1", gripper_switch_threshold=0.1)


def test_temporal_ensembling_averages_every_chunks_prediction_for_the_step(tmp_path):
    # hand-computed, K = 3, coeff ln 2 (weights 1, 1/2, 1/4, oldest first); a binary gripper is the weighted vote
    chunks = [np.array([[0.0, 1.0], [3.0, 0.0], [6.0, 0.0]]), np.array([[1.5, 0.0], [4.5, 0.0], [7.5, 1.0]]),
              np.array([[9.0, 1.0], [9.0, 0.0], [9.0, 0.0]])]
    for binary, gripper in ((False, [1.0, 0.0, 0.25 / 1.75]), (True, [1.0, 0.0, 0.0])):
        queue = ActionChunkQueue(n_action_steps=1, temporal_ensemble_coeff=float(np.log(2)), binary_gripper=binary)
        executed = []
        for chunk in chunks:
            queue.fill(0, chunk)
            executed.append(queue.pop(0).tolist())
        # step 1: (3 * 1 + 1.5 * 1/2) / 1.5 = 2.5; step 2: (6 * 1 + 4.5 * 1/2 + 9 * 1/4) / 1.75 = 6; the newest
        # chunk alone would open the gripper at step 2, the vote keeps it closed
        np.testing.assert_allclose(executed, np.stack([[0.0, 2.5, 6.0], gripper], 1), rtol=1e-6)
    queue.reset([0])  # a new episode forgets the earlier chunks
    queue.fill(0, chunks[2])
    np.testing.assert_allclose(queue.pop(0), [9.0, 1.0])
    with pytest.raises(ValueError, match="it needs n_action_steps=1, got 4"):
        ActionChunkQueue(n_action_steps=4, temporal_ensemble_coeff=0.01)

    # the policy setting: select_action and the evaluation harness execute the ensembled actions
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=3, n_action_steps=1, temporal_ensemble_coeff=0.5)
    obs = observations(batch(chunk=3))
    chunk = policy.predict_action_chunk(obs[0])
    policy.reset()
    first, second = policy.select_action(obs[0]), policy.select_action(obs[0])
    np.testing.assert_allclose(first, chunk[0], atol=1e-6)
    # the same observation twice: step 1 is predicted as chunk[1] by the first chunk and chunk[0] by the second
    blend = (chunk[1, :6] + np.exp(-0.5) * chunk[0, :6]) / (1 + np.exp(-0.5))
    np.testing.assert_allclose(second[:6], blend, atol=1e-5)
    harness = EvalCheckpointPolicy(policy)
    stacked = {"image": np.stack([obs[0]["image"]] * 2), "instruction": [obs[0]["instruction"]] * 2}
    harness.reset([0, 1])
    np.testing.assert_allclose([harness.act(stacked, SimpleNamespace(num_envs=2))[0] for _ in range(2)],
                               [first, second], atol=1e-5)
    policy.save_pretrained(tmp_path / "p")
    assert policies.load_pretrained(tmp_path / "p").config.temporal_ensemble_coeff == 0.5
    with pytest.raises(ValueError, match="it needs action_chunk >= 2 and n_action_steps=1, got action_chunk=3, "
                                         "n_action_steps=2"):
        policies.load_pretrained(tmp_path / "p", n_action_steps=2)
    with pytest.raises(ValueError, match="temporal_ensemble_coeff must be >= 0 or None, got -1"):
        policies.load_pretrained(tmp_path / "p", temporal_ensemble_coeff=-1.0)


def test_instruction_clauses_prompt_one_clause_and_move_on_once_the_arm_stands_still(tmp_path):
    from policies.instructions import split_instruction

    both = "press the red button, then put the blue cube in the tray"
    assert split_instruction(both) == ["press the red button", "put the blue cube in the tray"]
    # the second clause borrows the first one's verb
    assert split_instruction("put the red cube in the red tray and the blue cube in the blue tray") == [
        "put the red cube in the red tray", "put the blue cube in the blue tray"]
    assert split_instruction("  pick up   the red cube ") == ["pick up the red cube"]
    with pytest.raises(ValueError, match="an instruction must not be empty"):
        split_instruction(" ")

    chunk = np.array([[0.0, 0, 0, 0, 0, 0, 0.0]] * 2, np.float32)  # what the arm is commanded does not matter
    queue = ActionChunkQueue(n_action_steps=2, instruction_clauses=True, clause_hold_tolerance=0.003,
                             clause_still_steps=4)

    def run(stream, positions, gripper=0.0):
        """Prompt at each position, then execute a two-step chunk; the prompts given."""
        prompts = []
        for position in positions:
            prompts.append(queue.prompt(stream, both, position))
            queue.fill(stream, chunk + np.array([0, 0, 0, 0, 0, 0, gripper], np.float32))
            queue.pop(stream), queue.pop(stream)
        return prompts

    assert queue.prompt(1, "open the drawer", [0, 0, 0]) == "open the drawer"
    # moving, then within 3 mm for 4 steps (two chunks): the first clause is done at the third still prompt
    prompts = run(0, [[0, 0, 0.2], [0, 0, 0.1], [0, 0, 0.05], [0, 0, 0.051], [0, 0, 0.052]])
    assert prompts == ["press the red button"] * 4 + ["put the blue cube in the tray"] and queue.clause(0) == 1
    assert run(0, [[0, 0, 0.05]] * 4) == ["put the blue cube in the tray"] * 4  # the last clause stays
    # standing still while the gripper switches (a grasp) does not end a clause
    queue.reset([0])
    grasp = [0.1, 0, 0.05]
    first = (run(0, [grasp], gripper=1.0) + run(0, [grasp, grasp], gripper=0.0)  # 2 steps open, 4 closing
             + run(0, [[0.1, 0, 0.1]], gripper=0.0))  # then it lifts
    assert first == ["press the red button"] * 4 and queue.clause(0) == 0
    assert queue.prompt(0, both) == "press the red button"  # no position: no judgement
    assert ActionChunkQueue().prompt(0, both, [0, 0, 0]) == both  # off: the whole instruction
    with pytest.raises(ValueError, match="clause_hold_tolerance must be > 0"):
        ActionChunkQueue(instruction_clauses=True, clause_hold_tolerance=0.0)
    with pytest.raises(ValueError, match="clause_still_steps must be >= 1, got 0"):
        ActionChunkQueue(instruction_clauses=True, clause_still_steps=0)

    # the policy setting: select_action and the harness prompt with the clause, and a checkpoint keeps it
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=3, n_action_steps=3, instruction_clauses=True)
    obs = observations(batch(chunk=3))[0]
    first = policy.predict_action_chunk(obs, "press the red button")
    assert not np.allclose(first, policy.predict_action_chunk(obs, both), atol=1e-4)
    policy.reset()
    np.testing.assert_allclose(policy.select_action({**obs, "instruction": both}), first[0], atol=1e-5)
    harness = EvalCheckpointPolicy(policy)
    harness.reset([0])
    stacked = {"image": obs["image"][None], "instruction": [both]}
    np.testing.assert_allclose(harness.act(stacked, SimpleNamespace(num_envs=1))[0], first[0], atol=1e-5)
    policy.save_pretrained(tmp_path / "p")
    assert policies.load_pretrained(tmp_path / "p").config.instruction_clauses
    assert not policies.load_pretrained(tmp_path / "p", instruction_clauses=False).config.instruction_clauses
    with pytest.raises(ValueError, match="clause_hold_tolerance must be > 0"):
        policies.load_pretrained(tmp_path / "p", clause_hold_tolerance=-1.0)
    with pytest.raises(ValueError, match="clause_still_steps must be >= 1"):
        policies.load_pretrained(tmp_path / "p", clause_still_steps=0)


def test_a_clause_ends_when_the_fingers_let_go_of_what_they_held(tmp_path):
    """With clause_release_opening, an arm that never stands still (over a tray, after the release) moves on
    once its fingers, closed on something, open; fingers that closed on nothing (a missed grasp) do not."""
    sort = "put the red cube in the red tray and the blue cube in the blue tray"
    queue = ActionChunkQueue(n_action_steps=1, instruction_clauses=True, clause_release_opening=0.1)

    def run(steps):
        """(gripper command, observed opening) per step, the arm always moving; the prompts given."""
        prompts = []
        for t, (command, opening) in enumerate(steps):
            prompts.append(queue.prompt(0, sort, [0.01 * t, 0, 0.1], opening))
            queue.fill(0, np.array([0, 0, 0, 0, 0, 0, command], np.float32))
            queue.pop(0)
        return prompts

    missed = [(1.0, 1.0), (0.0, 1.0), (0.0, 0.01), (1.0, 0.01), (1.0, 1.0)]  # closed on nothing, then reopened
    assert run(missed) == ["put the red cube in the red tray"] * 5
    carried = [(0.0, 1.0), (0.0, 0.49), (0.0, 0.49), (1.0, 0.49), (1.0, 1.0)]  # a cube held, then let go
    assert run(carried) == ["put the red cube in the red tray"] * 4 + ["put the blue cube in the blue tray"]
    assert queue.clause(0) == 1
    assert run(carried) == ["put the blue cube in the blue tray"] * 5  # the last clause stays
    queue.reset([0])
    queue.clause_release_opening = 0.0  # off: the same release moves nothing on
    assert run(carried) == ["put the red cube in the red tray"] * 5
    with pytest.raises(ValueError, match=r"clause_release_opening must be in \[0, 1\).*got 1.5"):
        ActionChunkQueue(instruction_clauses=True, clause_release_opening=1.5)

    # the policy setting reaches its queue, a checkpoint keeps it and the evaluation may override it
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, n_action_steps=2, instruction_clauses=True,
                  clause_release_opening=0.1)
    assert ActionChunkQueue.for_config(policy.config).clause_release_opening == 0.1
    policy.save_pretrained(tmp_path / "p")
    assert policies.load_pretrained(tmp_path / "p").config.clause_release_opening == 0.1
    assert policies.load_pretrained(tmp_path / "p", clause_release_opening=0.0).config.clause_release_opening == 0.0
    with pytest.raises(ValueError, match="clause_release_opening must be in"):
        policies.load_pretrained(tmp_path / "p", clause_release_opening=-0.1)


def test_a_clause_done_head_learns_when_the_prompted_clause_is_done_and_moves_the_prompt_on(tmp_path):
    """Trained on frames labelled done (data.clause_done_frames), the head tells a done clause from one under way,
    and the queue moves on once its probability passes the threshold, however the arm moves."""
    both = "press the red button, then put the blue cube in the tray"
    data = batch(chunk=2, seed=5)
    data["action_mask"] = torch.tensor([[True, True], [True, True], [False, False], [False, False]])
    data["clause_done"] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    policy = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, n_action_steps=2, action_head="l1",
                  instruction_clauses=True, clause_done_loss_weight=1.0)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(150):
        loss, metrics = policy(data)
        first = first or metrics["clause_done_loss"]
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    assert metrics["clause_done_loss"] < 0.2 * first
    policy.eval()
    _, done = policy.predict_actions_and_clause_done(observations(data), data["instruction"])
    assert (done[:2] < 0.5).all() and (done[2:] > 0.5).all(), done
    with pytest.raises(KeyError, match="the batch needs 'clause_done'"):
        policy({k: v for k, v in data.items() if k != "clause_done"})

    queue = ActionChunkQueue.for_config(policy.config)  # moves on by the head, not by the arm standing still
    assert queue.clause_done_threshold == 0.5
    for probability, expected in ((0.2, "press the red button"), (0.7, "put the blue cube in the tray")):
        assert queue.prompt(0, both, [0, 0, 0.1]) == "press the red button"
        queue.clause_done(0, probability)
    assert queue.prompt(0, both, [0, 0, 0.1]) == expected
    queue.clause_done(0, 0.9)  # the last clause stays
    assert queue.prompt(0, both, [0, 0, 0.1]) == "put the blue cube in the tray"
    obs = observations(data)[2]  # select_action reports the head's probability to its queue
    policy.reset()
    policy.select_action({**obs, "instruction": both})
    assert policy._actions.clause_done_probability(0) == pytest.approx(
        float(policy.predict_actions_and_clause_done([obs], ["press the red button"])[1][0]), abs=1e-5)

    policy.save_pretrained(tmp_path / "p")
    loaded = policies.load_pretrained(tmp_path / "p")
    np.testing.assert_allclose(loaded.predict_actions_and_clause_done(observations(data), data["instruction"])[1],
                               done, atol=1e-5)
    for bad, message in (({"clause_done_threshold": 1.0}, "clause_done_threshold must be within"),
                         ({"clause_done_loss_weight": -1.0}, "clause_done_loss_weight must be >= 0"),
                         ({"action_head": "tokens"}, "it needs action_head='l1'")):
        with pytest.raises(ValueError, match=message):
            tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, **{"action_head": "l1",
                                                                        "clause_done_loss_weight": 1.0, **bad})


def test_proprio_token_lets_the_policy_tell_apart_identical_images(tmp_path):
    # Same image and instruction, different robot states and actions: only the state separates them.
    data = batch(seed=3)
    data["image"][:] = data["image"][0]
    data["instruction"] = [data["instruction"][0]] * 4
    rng = np.random.default_rng(0)
    data["state"] = torch.from_numpy(rng.normal(size=(4, 8)).astype(np.float32))
    data["action"] = torch.stack([data["action"], data["action"].flip(0)], dim=1)
    data["action_mask"] = torch.ones(4, 2, dtype=torch.bool)
    # parallel decoding: no teacher-forced token can give a sample away
    blind = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2)
    assert train_until_exact(blind, data, max_steps=60)["action_accuracy"] <= 0.5
    policy = tiny(OpenVLAPolicy, use_proprio=True, decoding="parallel", action_chunk=2, n_action_steps=1)
    assert train_until_exact(policy, data)["action_accuracy"] == 1.0
    obs = [{**o, "state": state.numpy()} for o, state in zip(observations(data), data["state"])]
    actions = policy.predict_actions(obs)
    np.testing.assert_allclose(actions, expected_actions(policy, data), atol=1e-6)
    # q and -q are one orientation: the processor gives them the same features
    flipped = data["state"].clone()
    flipped[:, 3:7] *= -1
    assert torch.equal(policy.processor.normalize_states(flipped), policy.processor.normalize_states(data["state"]))
    # n_action_steps: select_action re-plans after the first action of each chunk
    policy.reset()
    assert np.allclose(policy.select_action(obs[0]), actions[0, 0]) and policy._actions.needing([0]) == [0]
    policy.save_pretrained(tmp_path)
    loaded = policies.load_pretrained(tmp_path)
    assert loaded.config.use_proprio and loaded.config.n_action_steps == 1
    assert np.array_equal(loaded.predict_actions(obs), actions)
    with pytest.raises(KeyError, match="observation 0 has no 'state' key"):
        loaded.predict_actions(observations(data))
    with pytest.raises(ValueError, match=r"states must be \(B, 8\), got shape \(4, 7\)"):
        loaded.processor.normalize_states(data["state"][:, :7])
    with pytest.raises(ValueError, match="n_action_steps must be in"):
        tiny(OpenVLAPolicy, action_chunk=2, n_action_steps=3)


def test_prompt_and_shared_preprocessing():
    policy = tiny(OpenVLAPolicy)
    proc = policy.processor
    assert proc.prompt("Pick up the red cube.") == "In: What action should the robot take to pick up the red cube?\nOut:"
    data = batch(size=2)
    train_inputs = proc(data["image"], data["instruction"], actions=data["action"])
    eval_inputs = proc.from_observations(observations(data))
    for name in train_inputs["pixel_values"]:
        assert torch.equal(train_inputs["pixel_values"][name], eval_inputs["pixel_values"][name])
    n = train_inputs["n_slots"]
    assert n == 8  # 7 action tokens + the stop token
    assert torch.equal(train_inputs["input_ids"][:, :-n], eval_inputs["input_ids"])
    assert (train_inputs["input_ids"][:, 0] == policy.tokenizer.bos_token_id).all()
    assert (train_inputs["input_ids"][:, -1] == policy.tokenizer.eos_token_id).all()


# -- bad input ------------------------------------------------------------------------------------------

def test_bad_observations_are_refused_or_resized():
    policy = tiny(RT2Policy)
    image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    with pytest.raises(ValueError, match="empty instruction"):
        policy.predict_action({"image": image}, "   ")
    with pytest.raises(ValueError, match=r"uint8 of shape \(H, W, 3\) \(trained on \(32, 32, 3\)\), got dtype float32"):
        policy.predict_action({"image": image.astype(np.float32)}, "open the drawer")
    with pytest.raises(ValueError, match=r"got dtype uint8 and shape \(32, 32\)"):
        policy.predict_action({"image": image[..., 0]}, "open the drawer")
    with pytest.raises(KeyError, match="no 'image' key"):
        policy.predict_action({"state": np.zeros(8)}, "open the drawer")
    with pytest.warns(UserWarning, match="is 48x40, the policy was trained on 32x32 images; resizing"):
        action = policy.predict_action({"image": np.zeros((48, 40, 3), np.uint8)}, "open the drawer")
    assert action.shape == (7,)
    with pytest.raises(ValueError, match=r"actions must be \(B, 7\) or \(B, K, 7\) for B=4, got \(4, 1, 6\)"):
        policy({"image": batch()["image"], "instruction": batch()["instruction"], "action": torch.zeros(4, 6)})


def test_checkpoint_errors_name_what_is_wrong(tmp_path, monkeypatch):
    policy = tiny(RT2Policy)
    ckpt = tmp_path / "ckpt"
    policy.save_pretrained(ckpt)

    no_stats = tmp_path / "no_stats"
    shutil.copytree(ckpt, no_stats)
    (no_stats / "dataset_statistics.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no dataset_statistics.json"):
        policies.load_pretrained(no_stats)

    wrong_dim = tmp_path / "wrong_dim"
    shutil.copytree(ckpt, wrong_dim)
    (wrong_dim / "dataset_statistics.json").write_text(json.dumps(statistics(dim=6)))
    with pytest.raises(ValueError, match="have 6-D actions but the policy's action_dim is 7"):
        policies.load_pretrained(wrong_dim)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    (no_weights / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no weights \(model.safetensors\) in .*no_weights .*never loaded"):
        policies.load_pretrained(no_weights)

    with pytest.raises(FileNotFoundError, match="no config.json in policy checkpoint"):
        policies.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="'does/not/exist/here' does not exist"):
        policies.load_pretrained("does/not/exist/here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not find policy 'nobody/no-such-policy'"):
        policies.load_pretrained("nobody/no-such-policy")

    bare = tiny(RT2Policy)
    bare.processor.statistics = None
    with pytest.raises(RuntimeError, match="no dataset statistics to save"):
        bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="several datasets"):
        # (datasets normalized alike, data.shared_statistics, leave nothing to choose; these differ)
        bare.set_statistics({"a": statistics()["sim_tabletop10"], "b": statistics(seed=1)["sim_tabletop10"]})
        bare.predict_action({"image": np.zeros((IMAGE, IMAGE, 3), np.uint8)}, "open the drawer")


# -- sizes, configs, GPU paths --------------------------------------------------------------------------

def test_7b_builds_on_meta_and_the_command_prints_its_parameter_count(capsys):
    from policies.count_params import main

    counts = main(["--policy", "openvla", "--size", "7b"])
    out = capsys.readouterr().out
    assert 7.4e9 < counts["total"] < 7.6e9
    assert "openvla 7b: 7.53B parameters" in out
    assert counts["llm"] == 6_738_939_904  # Llama-2-7B with 32064 embedding rows (PAD added, padded to 64)
    assert counts["projector"] == 2176 * 8704 + 8704 + 8704 * 4096 + 4096 + 4096 * 4096 + 4096


def test_hydra_policy_configs_build_policies():
    from omegaconf import OmegaConf

    for name, cls in (("openvla", OpenVLAPolicy), ("rt2", RT2Policy)):
        cfg = OmegaConf.to_container(OmegaConf.load(f"embodied/conf/policy/{name}.yaml"))
        assert cfg["size"] == "tiny" and cfg["lora"]["r"] == 32 and cfg["lora"]["alpha"] == 16
        policy = policies.make_policy(cfg, statistics())
        assert type(policy) is cls and policy.config.size == "tiny"
    with pytest.raises(ValueError, match="unknown policy size 'huge'; valid: tiny, base, 7b"):
        policies.make_policy({"name": "openvla", "size": "huge"})
    with pytest.raises(ValueError, match="unknown policy type 'rt3'"):
        policies.make_policy({"name": "rt3"})


def test_gradient_checkpointing_gives_the_same_gradients():
    data = batch(size=2)
    grads = []
    for checkpointing in (False, True):
        policy = tiny(OpenVLAPolicy, gradient_checkpointing=checkpointing)
        policy.train()
        policy(data)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.gpu
def test_bf16_autocast_and_gradient_checkpointing_train_on_gpu():
    policy = tiny(OpenVLAPolicy, gradient_checkpointing=True).cuda()
    assert policy.config.autocast == "auto"
    data = batch(seed=3)
    metrics = train_until_exact(policy, data, max_steps=300)
    assert metrics["action_accuracy"] == 1.0
    with policy._autocast():
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")
    np.testing.assert_allclose(policy.predict_actions(observations(data))[:, 0], expected_actions(policy, data),
                               atol=1e-6)


def test_pretrained_components_load_from_local_directories(tmp_path):
    """The pretrained path (from_pretrained of towers, LLM, tokenizer), with local dirs standing in for hub ids."""
    donor = tiny(OpenVLAPolicy, seed=7)
    components = {"llm": tmp_path / "llm", "tokenizer": tmp_path / "tokenizer"}
    for name, tower in donor.vision.towers.items():
        tower.save_pretrained(tmp_path / name)
        components[name] = tmp_path / name
    donor.llm.save_pretrained(tmp_path / "llm")
    donor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    policy = OpenVLAPolicy.from_size("tiny", statistics=statistics(), components=components,
                                     observation_image_size=IMAGE, tower_image_size=56)
    assert policy.config.vision_towers[0]["pretrained"] == str(components["dinov2"])
    for name in ("vision", "llm"):
        for (key, a), b in zip(getattr(donor, name).state_dict().items(), getattr(policy, name).state_dict().values()):
            assert torch.equal(a, b), key
    policy.save_pretrained(tmp_path / "ckpt")  # and it is a regular checkpoint
    assert type(policies.load_pretrained(tmp_path / "ckpt")) is OpenVLAPolicy
    with pytest.raises(OSError, match=r"could not load the LLM '.*nowhere'"):
        OpenVLAPolicy.from_size("tiny", components={**components, "llm": tmp_path / "nowhere"}, tower_image_size=56)
    with pytest.raises(ValueError, match="takes 56 px images, the policy feeds it 112 px"):
        OpenVLAPolicy.from_size("tiny", components=components)
    with pytest.raises(ValueError, match="size 'tiny' has no pretrained dinov2"):
        OpenVLAPolicy.from_size("tiny", pretrained=True)


def test_gaussian_action_labels_score_near_misses_as_nearly_right():
    import torch.nn.functional as F

    from policies.action_tokenizer import ActionTokenizer
    from policies.openvla import action_token_loss

    tok = ActionTokenizer(vocab_size=512)
    target = torch.tensor([[tok.first_id + 100, 7]])  # an action token and a text (stop) token
    logits = torch.randn(1, 2, 512)
    assert torch.allclose(action_token_loss(logits, target, tok), F.cross_entropy(logits[0], target[0], reduction="none"))

    def peaked(offset, width=0.0):  # a confident prediction `offset` bins from the target (a bump if width)
        out = torch.full((1, 2, 512), -30.0)
        bins = torch.arange(tok.n_bins, dtype=torch.float32)
        out[0, 0, tok.first_id:] = -0.5 * ((bins - 100 - offset) / width) ** 2 if width else torch.where(
            bins == 100 + offset, 0.0, -30.0)
        out[0, 1, 7] = 0.0
        return out

    one_hot = [action_token_loss(peaked(o), target, tok)[0, 0] for o in (2, 100)]
    assert torch.isclose(one_hot[0], one_hot[1])  # one-hot: two bins off costs as much as a hundred
    near, far = (action_token_loss(peaked(o, width=2.0), target, tok, sigma_bins=2.0)[0, 0] for o in (2, 100))
    assert near < far / 100
    assert torch.isclose(action_token_loss(peaked(2), target, tok, 2.0)[0, 1],
                         action_token_loss(peaked(2), target, tok)[0, 1])  # the stop token stays one-hot
    free = torch.zeros(1, 2, 512, requires_grad=True)  # fitting free logits puts the argmax on the target bin
    optimizer = torch.optim.Adam([free], lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        action_token_loss(free, target, tok, sigma_bins=3.0).sum().backward()
        optimizer.step()
    assert int(free[0, 0].argmax()) == tok.first_id + 100
    with pytest.raises(ValueError, match="label_sigma_bins must be >= 0"):
        from policies.openvla import OpenVLAPolicy
        OpenVLAPolicy.default_config("tiny", label_sigma_bins=-1).validate()


def test_keyframe_head_learns_where_the_image_says_the_arm_goes(tmp_path):
    # Same instruction and state everywhere; the keyframe's x follows a bright square's column in the image.
    # The head can only get it right by reading the patches (the query carries no image).
    data = batch(size=8, seed=5)
    data["image"][:] = 0
    data["instruction"] = [data["instruction"][0]] * 8
    data["state"] = torch.zeros(8, 8)
    data["keyframe_state"] = torch.zeros(8, 8)
    for i in range(8):
        column = 4 * i
        data["image"][i, 12:20, column:column + 4] = 255
        data["keyframe_state"][i, 0] = -1.5 + 3.0 * i / 7  # spans the statistics' proprio range
    policy = tiny(OpenVLAPolicy, use_proprio=True, keyframe_loss_weight=1.0)
    target = policy.processor.normalize_states(data["keyframe_state"])
    first, metrics = train_steps(policy, data)
    # the squares' columns explain the targets: the error falls far below their variance (~0.06 of 8 dims)
    assert metrics["keyframe_loss"] < 0.1 * float(target.var(0, unbiased=False).mean()) < first["keyframe_loss"]
    obs = [{**o, "state": np.zeros(8, np.float32)} for o in observations(data)]
    predicted = policy.predict_keyframe_states(obs)  # raw units, as the data reader yields the targets
    np.testing.assert_allclose(predicted[:, 0], data["keyframe_state"][:, 0].numpy(), atol=0.2)
    with pytest.raises(ValueError, match="no keyframe head"):
        tiny(OpenVLAPolicy).predict_keyframe_states(observations(data))
    policy.save_pretrained(tmp_path)
    loaded = policies.load_pretrained(tmp_path)
    assert loaded.config.keyframe_loss_weight == 1.0
    assert torch.equal(loaded.keyframe_head.out[-1].weight, policy.keyframe_head.out[-1].weight)
    del data["keyframe_state"]
    with pytest.raises(KeyError, match=r"needs 'keyframe_state' \(data.keyframe_states=true\)"):
        loaded(data)
    with pytest.raises(ValueError, match="keyframe_loss_weight must be >= 0"):
        OpenVLAPolicy.default_config("tiny", keyframe_loss_weight=-1).validate()
    with pytest.raises(ValueError, match="keyframe_token needs keyframe_loss_weight > 0"):
        OpenVLAPolicy.default_config("tiny", keyframe_token=True).validate()


def test_keyframe_token_is_read_at_inference_and_survives_save_and_load(tmp_path):
    data = batch(size=4, chunk=2, seed=6)
    data["state"], data["keyframe_state"] = torch.zeros(4, 8), torch.randn(4, 8) * 0.1
    policy = tiny(OpenVLAPolicy, use_proprio=True, keyframe_loss_weight=1.0, keyframe_token=True,
                  decoding="parallel", action_chunk=2)
    train_until_exact(policy, data, max_steps=20)
    obs = [{**o, "state": np.zeros(8, np.float32)} for o in observations(data)]
    inputs = policy.processor.from_observations(obs)
    with torch.no_grad():
        logits = policy._slot_logits(inputs)
        policy.keyframe_projector[-1].bias.add_(1.0)  # the token carries the prediction into the LLM
        assert (policy._slot_logits(inputs) - logits).abs().max() > 1e-3
    policy.save_pretrained(tmp_path)
    loaded = policies.load_pretrained(tmp_path)
    assert loaded.config.keyframe_token and np.array_equal(loaded.predict_actions(obs), policy.predict_actions(obs))
