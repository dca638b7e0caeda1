"""Localization pretraining: privileged positions of rendered layouts, and the stage that trains on them."""
import json

import numpy as np
import pytest
import torch

from conftest import SMALL
from envs.env import TabletopEnv
from envs.layouts import MAX_NAMED, SLOTS, render_layouts


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


def test_named_slots_are_the_objects_the_instruction_names_in_its_order():
    layouts = render_layouts("PlaceInTray", [3, 4], image_size=SMALL, arm_steps=0)
    env = TabletopEnv("PlaceInTray", image_size=SMALL)
    try:
        for i, seed in enumerate([3, 4]):
            env.reset(seed=seed)
            words = env.instruction.split()  # "put the <colour> cube in the <colour> tray"
            assert layouts["instructions"][i] == env.instruction
            assert [SLOTS[k] for k in layouts["named"][i] if k >= 0] == [words[2], words[-2] + "_tray"]
            np.testing.assert_allclose(layouts["positions"][i, layouts["named"][i, 1]], env.sim.object_pose("tray")[0],
                                       atol=1e-6)
    finally:
        env.close()
    sort = render_layouts("SortByColor", [5], image_size=SMALL, arm_steps=0)
    a, b = sort["instructions"][0].split()[2], sort["instructions"][0].split()[-2]
    assert [SLOTS[k] for k in sort["named"][0]] == [a, a + "_tray", b, b + "_tray"]
    assert sort["named"].shape == (1, MAX_NAMED)
    # the grounding also learns each clause of a multi-step instruction, with the objects that clause names
    assert sort["grounding_texts"].tolist() == [sort["instructions"][0], f"put the {a} cube in the {a} tray",
                                                f"put the {b} cube in the {b} tray"]
    assert [[SLOTS[k] for k in row if k >= 0] for row in sort["grounding_named"]] == [
        [a, a + "_tray", b, b + "_tray"], [a, a + "_tray"], [b, b + "_tray"]]
    both = render_layouts("ButtonThenTray", [5], image_size=SMALL, arm_steps=0)
    button, cube = both["instructions"][0].split()[2], both["instructions"][0].split()[-5]
    assert [[SLOTS[k] for k in row if k >= 0] for row in both["grounding_named"]] == [
        [button, cube, "gray_tray"], [button], [cube, "gray_tray"]]
    single = render_layouts("PlaceInTray", [3], image_size=SMALL, arm_steps=0)
    assert single["grounding_texts"].tolist() == single["instructions"].tolist()


def test_expert_arm_layouts_show_the_arm_at_work():
    still = render_layouts("PickCube", range(8), image_size=SMALL, arm_steps=0)
    working = render_layouts("PickCube", range(8), image_size=SMALL, arm_steps=10, arm="expert")
    assert (np.abs(still["images"].astype(int) - working["images"]).mean(axis=(1, 2, 3)) > 0.5).sum() >= 6
    # the expert reaches, grasps and lifts: in some layouts the named cube is already off the table
    cube = working["positions"][np.arange(8), working["named"][:, 0]]
    assert (cube[:, 2] > 0.03).any(), cube
    with pytest.raises(ValueError, match="unknown arm motion 'scripted'; valid: random, expert"):
        render_layouts("PickCube", [0], image_size=SMALL, arm="scripted")


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
                                     suite="tabletop_pick_place", arm_steps=2, threads=1)
    threads = torch.get_num_threads()
    report = pretrain_vision(policy, config, tmp_path)
    assert torch.get_num_threads() == threads  # the run's own setting is restored
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
    with pytest.raises(ValueError, match="vision_pretraining.threads must be >= 1 or null, got 0"):
        VisionPretrainingConfig.from_dict({"layouts": 10, "threads": 0})


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


def test_named_object_tokens_follow_the_instruction(tmp_path):
    import policies
    from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import batch, observations, tiny

    policy = tiny(OpenVLAPolicy, object_slots=len(SLOTS), named_objects=MAX_NAMED, use_proprio=True,
                  train_vision=False, decoding="parallel", action_chunk=2)
    report = pretrain_vision(policy, VisionPretrainingConfig(layouts=60, steps=150, batch_size=16, num_workers=1,
                                                             arm_steps=0, suite="tabletop_pick_place"), tmp_path)
    assert report["named_objects_heldout_accuracy"] == 1.0, report
    assert not any(p.requires_grad for p in policy.grounding.parameters())
    # the grounding reads the instruction: red is slot 0, blue slot 2, trays after the four colours
    ids, mask = policy.processor.prompt_inputs(["put the red cube in the blue tray", "pick up the yellow cube"])
    with torch.no_grad():
        chosen = policy.grounding(ids, mask).argmax(-1)
    assert chosen.tolist() == [[0, SLOTS.index("blue_tray"), len(SLOTS), len(SLOTS)], [3, len(SLOTS), len(SLOTS), len(SLOTS)]]

    data = batch(size=4, chunk=2, seed=3)
    data["state"] = torch.tensor([[0.45, 0.0, 0.3, 1, 0, 0, 0, 1]] * 4)
    loss, _ = policy(data)
    loss.backward()
    assert policy.named_projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.grounding.parameters())
    obs = [dict(o, state=s.numpy()) for o, s in zip(observations(data), data["state"])]
    inputs = policy.processor.from_observations(obs)
    with torch.no_grad():
        logits = policy._slot_logits(inputs)
        bias = policy.grounding.out.bias.clone()
        policy.grounding.out.bias[0] += 100.0  # every named object is now the red one: other tokens, other actions
        assert (policy._slot_logits(inputs) - logits).abs().max() > 1e-3
        policy.grounding.out.bias.copy_(bias)
    policy.save_pretrained(tmp_path / "policy")
    loaded = policies.load_pretrained(tmp_path / "policy")
    assert loaded.config.named_objects == MAX_NAMED
    assert np.array_equal(loaded.predict_actions(obs), policy.predict_actions(obs))
    with torch.no_grad():
        assert torch.equal(loaded._slot_logits(inputs), logits)


def test_a_saved_pretraining_starts_another_policy_and_refuses_another_architecture(tmp_path):
    from embodied.vision_pretraining import (PRETRAINED_PARTS, WEIGHTS_FILE, VisionPretrainingConfig,
                                             load_pretrained_vision, pretrain_vision)
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import tiny

    settings = dict(object_slots=len(SLOTS), named_objects=MAX_NAMED, use_proprio=True, train_vision=False)
    policy = tiny(OpenVLAPolicy, **settings)
    pretrain_vision(policy, VisionPretrainingConfig(layouts=20, steps=5, batch_size=4, num_workers=1, arm_steps=0),
                    tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file()
    fresh = tiny(OpenVLAPolicy, seed=1, **settings)
    assert not torch.equal(fresh.projector[0].weight, policy.projector[0].weight)
    (tmp_path / "run").mkdir()
    load_pretrained_vision(fresh, tmp_path, run_dir=tmp_path / "run")
    for name in PRETRAINED_PARTS:
        for key, value in getattr(policy, name).state_dict().items():
            assert torch.equal(getattr(fresh, name).state_dict()[key], value), f"{name}.{key}"
    # only the stage's parts: the LLM keeps its own weights
    assert not torch.equal(fresh.llm.get_input_embeddings().weight, policy.llm.get_input_embeddings().weight)
    report = json.loads((tmp_path / "run" / "vision_pretraining.json").read_text())
    assert report["loaded_from"] == str(tmp_path) and report["layouts"] == 20

    # a policy without object tokens takes the towers and the projector; the readout is not its to keep
    plain = tiny(OpenVLAPolicy, seed=2)
    load_pretrained_vision(plain, tmp_path)
    assert torch.equal(plain.projector[0].weight, policy.projector[0].weight)
    # a wrist-camera readout has heatmaps this file does not
    wrist = tiny(OpenVLAPolicy, wrist_image=True, **settings)
    with pytest.raises(ValueError, match=r"lacks object_readout\.wrist_scores\.weight.*wrist_image=False"):
        load_pretrained_vision(wrist, tmp_path)
    # towers at another image size have other position embeddings
    other = tiny(OpenVLAPolicy, **settings)
    other.vision = OpenVLAPolicy.from_size("tiny", observation_image_size=other.config.observation_image_size,
                                           **settings).vision
    with pytest.raises(ValueError, match=r"vision\..*position.*has shape .* this policy's"):
        load_pretrained_vision(other, tmp_path)
    # the readout places objects for the image size it was trained on
    tower_size = next(iter(policy.vision.towers.values())).config.image_size
    other = OpenVLAPolicy.from_size("tiny", observation_image_size=112, tower_image_size=tower_size, **settings)
    with pytest.raises(ValueError, match="was trained on .* px images, this policy reads 112 px"):
        load_pretrained_vision(other, tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_FILE} in .*nowhere.*shipped: "):
        load_pretrained_vision(plain, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="set only one of them"):
        VisionPretrainingConfig.from_dict({"layouts": 10, "checkpoint": str(tmp_path)})


def test_the_shipped_pretraining_locates_objects_on_the_suites_evaluation_layouts():
    from embodied.vision_pretraining import CENTRE, SCALE, load_pretrained_vision, shipped_checkpoint
    from envs.suites import get_suite
    from policies.openvla import OpenVLAPolicy

    torch.manual_seed(0)
    settings = dict(object_slots=len(SLOTS), named_objects=MAX_NAMED, use_proprio=True, train_vision=False)
    policy = OpenVLAPolicy.from_size("tiny", observation_image_size=112, wrist_image=True, **settings)
    found = shipped_checkpoint(policy)
    assert found is not None and found.name == "tabletop10-tiny-wrist"
    load_pretrained_vision(policy, found)
    seeds = get_suite("tabletop10").episode_seeds("PlaceInTray", 8, seed=0)  # layouts the readout never saw
    layouts = render_layouts("PlaceInTray", seeds, image_size=112, arm_steps=0, wrist_camera=True)
    with torch.no_grad():
        located = policy.locate_objects(layouts["images"], layouts["states"], layouts["wrist_images"]).float().numpy()
    present = layouts["present"] > 0
    error = np.linalg.norm(located * SCALE + CENTRE - layouts["positions"], axis=-1)[present]
    mean = np.stack([layouts["positions"][present[:, k], k].mean(0) if present[:, k].any() else np.zeros(3)
                     for k in range(len(SLOTS))])
    spread = np.linalg.norm(layouts["positions"] - mean, axis=-1)[present]  # guessing each object's mean position
    assert np.median(error) < 0.04 and np.median(error) < 0.5 * np.median(spread), (error, spread)
    # its grounding names the objects of every instruction and of each clause of the multi-step ones
    from envs.layouts import instruction_examples

    for task in ("ButtonThenTray", "SortByColor", "PlaceInTray"):
        env = TabletopEnv(task, image_size=SMALL)
        try:
            for seed in get_suite("tabletop10").episode_seeds(task, 5, seed=0):
                env.reset(seed=int(seed))
                texts, named = zip(*instruction_examples(env))
                ids, mask = policy.processor.prompt_inputs(list(texts))
                with torch.no_grad():
                    chosen = policy.grounding(ids, mask).argmax(-1).numpy()
                expected = np.where(np.stack(named) < 0, len(SLOTS), np.stack(named))
                assert (chosen == expected).all(), (texts, chosen, expected)
        finally:
            env.close()
    # only a policy that reads located objects starts from it, and only at the size it was made for
    assert shipped_checkpoint(OpenVLAPolicy.from_size("tiny", observation_image_size=112)) is None
    assert shipped_checkpoint(OpenVLAPolicy.from_size("tiny", observation_image_size=56, wrist_image=True,
                                                      **settings)) is None


def test_named_object_features_are_the_chosen_positions_from_the_gripper():
    from policies.openvla import named_object_features

    located = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]])  # two slots, readout units
    logits = torch.tensor([[[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]]])  # slot 0, then "none"
    tcp = torch.tensor([[0.6, 0.1, 0.2]])  # metres: (0.6 - 0.5, 0.1 - 0, 0.2 - 0.1) / 0.1 = (1, 1, 1) in units
    features = named_object_features(logits, located, tcp)
    torch.testing.assert_close(features[0, 0], torch.tensor([1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 0.0]))
    torch.testing.assert_close(features[0, 1, -1], torch.tensor(1.0))
    with_relations = named_object_features(logits, located, tcp, relations=True)
    torch.testing.assert_close(with_relations[..., :7], features)
    torch.testing.assert_close(with_relations[0, 0, 7:], torch.zeros(3))  # the first named object from itself
    logits = torch.tensor([[[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]]])  # slot 0, then slot 1 (push: cube, then goal)
    torch.testing.assert_close(named_object_features(logits, located, tcp, relations=True)[0, 1, 7:],
                               torch.tensor([-2.0, -2.0, -2.5]))


def test_named_relations_tokens_train_and_round_trip(tmp_path):
    import policies
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import batch, observations, tiny

    policy = tiny(OpenVLAPolicy, object_slots=len(SLOTS), named_objects=MAX_NAMED, named_relations=True,
                  use_proprio=True, train_vision=False, decoding="parallel", action_chunk=2)
    assert policy.named_projector[0].in_features == 10
    data = batch(size=4, chunk=2, seed=3)
    data["state"] = torch.tensor([[0.45, 0.0, 0.3, 1, 0, 0, 0, 1]] * 4)
    loss, _ = policy(data)
    loss.backward()
    assert policy.named_projector[0].weight.grad[:, 7:].abs().sum() > 0  # the relation inputs are read
    obs = [dict(o, state=s.numpy()) for o, s in zip(observations(data), data["state"])]
    policy.save_pretrained(tmp_path / "policy")
    loaded = policies.load_pretrained(tmp_path / "policy")
    assert loaded.config.named_relations
    assert np.array_equal(loaded.predict_actions(obs), policy.predict_actions(obs))


@pytest.mark.parametrize("option, requirement", [("image_patches", "object_slots"), ("slot_tokens", "named_objects")])
def test_policy_options_that_drop_input_tokens(tmp_path, option, requirement):
    """image_patches=false: no image patch in the LLM's input; slot_tokens=false: no token per located slot.
    Both leave the named-object tokens, still trained; the policy round-trips."""
    import policies
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import batch, observations, tiny

    with pytest.raises(ValueError, match=f"{option}=false .* needs {requirement}"):
        tiny(OpenVLAPolicy, **{option: False})
    settings = dict(object_slots=len(SLOTS), named_objects=MAX_NAMED, use_proprio=True, train_vision=False,
                    decoding="parallel", action_chunk=2)
    data = batch(size=4, chunk=2, seed=3)
    data["state"] = torch.tensor([[0.45, 0.0, 0.3, 1, 0, 0, 0, 1]] * 4)
    lengths = {}
    for kept in (True, False):
        torch.manual_seed(0)
        policy = tiny(OpenVLAPolicy, **{option: kept}, **settings)
        inputs = policy.processor(data["image"], data["instruction"], actions=data["action"], states=data["state"],
                                  decoding="parallel", device=policy.device)
        lengths[kept] = policy._embed(inputs)[0].shape[1]
    dropped = policy.vision.num_patches if option == "image_patches" else len(SLOTS)
    assert lengths[True] - lengths[False] == dropped
    loss, _ = policy(data)
    loss.backward()
    assert policy.named_projector[0].weight.grad.abs().sum() > 0
    if option == "image_patches":  # the projector's output is not read
        assert all(p.grad is None or not p.grad.any() for p in policy.projector.parameters())
    else:
        assert policy.object_projector is None and policy.object_embeddings is None
    obs = [dict(o, state=s.numpy()) for o, s in zip(observations(data), data["state"])]
    policy.save_pretrained(tmp_path / "policy")
    loaded = policies.load_pretrained(tmp_path / "policy")
    assert getattr(loaded.config, option) is False
    assert np.array_equal(loaded.predict_actions(obs), policy.predict_actions(obs))


def test_named_objects_errors():
    from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision
    from policies.lora import LoraSettings, apply_lora
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import tiny

    with pytest.raises(ValueError, match="named_relations places named objects from the first one"):
        OpenVLAPolicy.default_config("tiny", named_relations=True).validate()
    with pytest.raises(ValueError, match="named_objects needs object_slots > 0"):
        OpenVLAPolicy.default_config("tiny", named_objects=4, use_proprio=True).validate()
    with pytest.raises(ValueError, match="use_proprio=true"):
        OpenVLAPolicy.default_config("tiny", named_objects=4, object_slots=10, train_vision=False).validate()
    policy = tiny(OpenVLAPolicy, object_slots=len(SLOTS), named_objects=2, use_proprio=True, train_vision=False)
    with pytest.raises(ValueError, match=f"set policy.named_objects={MAX_NAMED}"):
        pretrain_vision(policy, VisionPretrainingConfig(layouts=10, steps=1))
    with pytest.raises(ValueError, match="expert_fraction must be in"):
        VisionPretrainingConfig.from_dict({"layouts": 10, "expert_fraction": 1.5})
    model = apply_lora(policy, LoraSettings())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("named_projector" in n for n in trainable) and any("named_embeddings" in n for n in trainable)
    assert not any("grounding" in n for n in trainable)


def test_wrist_camera_layouts_carry_the_wrist_image_and_the_robot_state():
    layouts = render_layouts("PickCube", [3, 4], image_size=SMALL, arm_steps=0, wrist_camera=True)
    env = TabletopEnv("PickCube", image_size=SMALL, wrist_camera=True)
    try:
        for i, seed in enumerate([3, 4]):
            obs, _ = env.reset(seed=seed)
            np.testing.assert_array_equal(layouts["wrist_images"][i], obs["wrist_image"])
            np.testing.assert_array_equal(layouts["states"][i], obs["state"])
    finally:
        env.close()
    assert "wrist_images" not in render_layouts("PickCube", [3], image_size=SMALL, arm_steps=0)


def test_wrist_camera_policy_reads_both_images_and_places_objects_with_the_gripper_pose(tmp_path):
    import policies
    from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import batch, observations, tiny

    policy = tiny(OpenVLAPolicy, wrist_image=True, object_slots=len(SLOTS), named_objects=MAX_NAMED, use_proprio=True,
                  train_vision=False, decoding="parallel", action_chunk=2)
    report = pretrain_vision(policy, VisionPretrainingConfig(layouts=20, steps=20, batch_size=4, num_workers=1,
                                                             arm_steps=2, suite="tabletop_pick_place"))
    assert report["final_loss"] < report["first_loss"], report
    data = batch(size=4, chunk=2, seed=3)
    data["state"] = torch.tensor([[0.45, 0.0, 0.3, 1, 0, 0, 0, 1]] * 4)
    with pytest.raises(ValueError, match="pass wrist images"):
        policy(data)
    data["wrist_image"] = batch(size=4, seed=4)["image"]
    loss, _ = policy(data)
    loss.backward()
    assert policy.projector[0].weight.grad.abs().sum() > 0
    obs = [dict(o, state=s.numpy()) for o, s in zip(observations(data), data["state"])]
    with pytest.raises(KeyError, match="no 'wrist_image' key.*wrist camera.*wrist_camera=true"):
        policy.processor.from_observations(obs)
    obs = [dict(o, wrist_image=w.numpy()) for o, w in zip(obs, data["wrist_image"])]
    inputs = policy.processor.from_observations(obs)
    with torch.no_grad():
        logits = policy._slot_logits(inputs)
        located = policy.object_readout(*[f.float() for f in policy.encode_images(inputs)], inputs["state"])
        # another wrist image alone moves the located objects and the actions' logits
        other = policy.processor.from_observations([dict(o, wrist_image=np.zeros_like(o["wrist_image"])) for o in obs])
        moved = policy.object_readout(*[f.float() for f in policy.encode_images(other)], other["state"])
        assert (moved - located).abs().max() > 1e-4
        assert (policy._slot_logits(other) - logits).abs().max() > 1e-4
        # so does the gripper's pose, which places what the wrist camera sees
        lifted = dict(inputs, state=inputs["state"] + torch.tensor([0.0, 0.0, 0.1, 0, 0, 0, 0, 0]))
        assert (policy.object_readout(*[f.float() for f in policy.encode_images(inputs)], lifted["state"])
                - located).abs().max() > 1e-4
    policy.save_pretrained(tmp_path)
    loaded = policies.load_pretrained(tmp_path)
    assert loaded.config.wrist_image
    assert np.array_equal(loaded.predict_actions(obs), policy.predict_actions(obs))
    with pytest.raises(ValueError, match="object_slots with wrist_image needs use_proprio=true"):
        OpenVLAPolicy.default_config("tiny", wrist_image=True, object_slots=10, train_vision=False).validate()


def test_gripper_pose_makes_the_quaternion_sign_canonical():
    from policies.openvla import gripper_pose

    state = torch.tensor([[0.6, 0.1, 0.2, 0.1, -0.9, 0.1, 0.2, 1.0]])
    flipped = state.clone()
    flipped[:, 3:7] *= -1
    torch.testing.assert_close(gripper_pose(state), gripper_pose(flipped))
    torch.testing.assert_close(gripper_pose(state)[0, :3], torch.tensor([1.0, 1.0, 1.0]))
