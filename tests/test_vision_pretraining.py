"""Localization pretraining: privileged positions of rendered layouts, and the stage that trains on them."""
import json

import numpy as np
import pytest
import torch

from conftest import SMALL
from envs.env import TabletopEnv
from envs.layouts import SLOTS, render_layouts


def test_layout_positions_are_the_instructed_objects(backend):
    seeds = [3, 4, 5]
    layouts = render_layouts("PickCube", seeds, backend=backend, image_size=SMALL, arm_steps=0)
    assert layouts["images"].shape == (3, SMALL, SMALL, 3) and layouts["images"].dtype == np.uint8
    assert layouts["present"].sum(1).tolist() == [3, 3, 3]  # the cube and two distractors, each its own colour
    env = TabletopEnv("PickCube", backend=backend, image_size=SMALL)
    try:
        for i, seed in enumerate(seeds):
            obs, _ = env.reset(seed=seed)
            np.testing.assert_array_equal(obs["image"], layouts["images"][i])
            colour = env.instruction.split()[-2]  # "pick up the <colour> cube"
            np.testing.assert_allclose(layouts["positions"][i, SLOTS.index(colour)], env.sim.object_pose("cube")[0],
                                       atol=1e-6)
    finally:
        env.close()
    drawer = render_layouts("OpenDrawer", [3], backend=backend, image_size=SMALL, arm_steps=0)
    assert [SLOTS[i] for i in np.flatnonzero(drawer["present"][0])] == ["drawer_handle"]


def test_arm_moves_before_the_image_and_positions_follow_the_scene():
    still = render_layouts("PushCube", range(6), image_size=SMALL, arm_steps=0)
    moved = render_layouts("PushCube", range(6), image_size=SMALL, arm_steps=10)
    assert (np.abs(still["images"].astype(int) - moved["images"]).mean(axis=(1, 2, 3)) > 0.5).sum() >= 3
    # the goal marker cannot be pushed: where it is does not depend on the arm
    np.testing.assert_array_equal(still["present"], moved["present"])


@pytest.fixture(scope="module")
def small_policy():
    from policies.openvla import OpenVLAPolicy

    torch.manual_seed(0)
    return OpenVLAPolicy.from_size("tiny", observation_image_size=56, tower_image_size=56)


def test_pretraining_trains_towers_and_projector_only(small_policy, tmp_path):
    from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision

    policy = small_policy
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    policy.set_trainable(vision=False, projector=True, llm=True)
    config = VisionPretrainingConfig(layouts=40, steps=80, batch_size=8, warmup_steps=5, num_workers=1,
                                     suite="tabletop_pick_place", arm_steps=2)
    report = pretrain_vision(policy, config, tmp_path)
    assert json.loads((tmp_path / "vision_pretraining.json").read_text())["heldout_layouts"] == report["heldout_layouts"] == 2
    assert report["layouts"] == 40 and report["slots"] == list(SLOTS)
    assert report["final_loss"] < 0.9 * report["first_loss"], report
    after = policy.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "projector"}
    # the trainable flags the policy had before are restored
    assert not any(p.requires_grad for p in policy.vision.parameters())
    assert all(p.requires_grad for p in policy.projector.parameters())


def test_bad_config_is_refused():
    from embodied.vision_pretraining import VisionPretrainingConfig

    with pytest.raises(ValueError, match="unknown vision_pretraining key.*'layout'"):
        VisionPretrainingConfig.from_dict({"layout": 10})
    with pytest.raises(ValueError, match="steps=0"):
        VisionPretrainingConfig.from_dict({"layouts": 10, "steps": 0})


def test_object_tokens_read_the_pretrained_readout_frozen_and_survive_save_and_load(tmp_path):
    import policies
    from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import batch, observations, tiny

    policy = tiny(OpenVLAPolicy, object_slots=len(SLOTS), train_vision=False, decoding="parallel", action_chunk=2)
    readout_before = {k: v.clone() for k, v in policy.object_readout.state_dict().items()}
    pretrain_vision(policy, VisionPretrainingConfig(layouts=20, steps=5, batch_size=4, num_workers=1, arm_steps=0))
    assert any(not torch.equal(v, policy.object_readout.state_dict()[k]) for k, v in readout_before.items())
    # policy training leaves the readout (and the towers it reads) alone, and trains the tokens' projector
    assert not any(p.requires_grad for p in policy.object_readout.parameters())
    assert not any(p.requires_grad for p in policy.vision.parameters())
    data = batch(size=4, chunk=2, seed=3)
    loss, _ = policy(data)
    loss.backward()
    assert policy.object_projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.object_readout.parameters())
    inputs = policy.processor.from_observations(observations(data))
    with torch.no_grad():
        logits = policy._slot_logits(inputs)
        policy.object_readout.out[-1].bias.add_(1.0)  # other positions, other actions
        assert (policy._slot_logits(inputs) - logits).abs().max() > 1e-3
    policy.save_pretrained(tmp_path)
    loaded = policies.load_pretrained(tmp_path)
    assert loaded.config.object_slots == len(SLOTS)
    assert np.array_equal(loaded.predict_actions(observations(data)), policy.predict_actions(observations(data)))


def test_object_slots_errors():
    from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import tiny

    with pytest.raises(ValueError, match="object_slots needs train_vision=false"):
        OpenVLAPolicy.default_config("tiny", object_slots=10).validate()
    policy = tiny(OpenVLAPolicy, object_slots=3, train_vision=False)
    with pytest.raises(ValueError, match=f"set policy.object_slots={len(SLOTS)}"):
        pretrain_vision(policy, VisionPretrainingConfig(layouts=10, steps=1))


def test_lora_trains_the_object_tokens_and_keeps_the_readout_frozen():
    from policies.lora import LoraSettings, apply_lora
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import tiny

    model = apply_lora(tiny(OpenVLAPolicy, object_slots=len(SLOTS), train_vision=False), LoraSettings())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("object_projector" in n for n in trainable) and any("object_embeddings" in n for n in trainable)
    assert not any("object_readout" in n or ".vision." in n for n in trainable)
