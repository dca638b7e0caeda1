"""LoRA adapters (peft) on tiny policies: defaults, plain-peft loading, merging."""
from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

import policies
from policies import OpenVLAPolicy, RT2Policy
from policies.lora import LoraSettings, apply_lora, lora_target_names, merge_lora
from policy_helpers import single_thread, batch, observations, tiny  # noqa: F401 (autouse fixture)


def lora_train(model, data, steps=4, lr=5e-3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = model(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def slot_logits(model, data):
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    inputs = base.processor(data["image"], data["instruction"], actions=data["action"])
    with torch.no_grad():
        return base._slot_logits(inputs)


def test_lora_defaults_are_openvlas_and_freeze_the_towers():
    policy = tiny(OpenVLAPolicy)
    settings = LoraSettings()
    assert (settings.r, settings.alpha, settings.dropout, settings.target_modules) == (32, 16, 0.0, "all-linear")
    targets = lora_target_names(policy, settings)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in policy.llm.modules())
    assert len(targets) == n_linear - 1 and "llm.lm_head" not in targets  # every LLM linear but the head
    model = apply_lora(policy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".vision." in n for n in trainable)
    assert any(".projector.modules_to_save." in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and not any("lm_head" in n for n in trainable)
    frozen_llm = [n for n, p in model.named_parameters() if ".llm." in n and "lora_" not in n and p.requires_grad]
    assert frozen_llm == []
    # configurable: train the towers in full too, or put adapters on them
    model = apply_lora(tiny(OpenVLAPolicy), LoraSettings(train_vision=True))
    assert any(".vision.modules_to_save." in n and p.requires_grad for n, p in model.named_parameters())
    assert len(lora_target_names(tiny(RT2Policy), LoraSettings(lora_parts=["llm", "vision"]))) > n_linear - 1
    with pytest.raises(ValueError, match="unknown lora_parts"):
        lora_target_names(policy, LoraSettings(lora_parts=["projector"]))


def test_adapter_loads_with_plain_peft_and_merges(tmp_path):
    base = tiny(OpenVLAPolicy)
    base.save_pretrained(tmp_path / "base")
    data = batch(seed=5)
    model = lora_train(apply_lora(policies.load_pretrained(tmp_path / "base")), data)
    with pytest.raises(RuntimeError, match="carries LoRA adapters"):
        model.get_base_model().save_pretrained(tmp_path / "nope")
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    # plain peft on a freshly loaded base gives identical outputs
    reloaded = peft.PeftModel.from_pretrained(policies.load_pretrained(tmp_path / "base"), tmp_path / "adapter")
    tuned_logits = slot_logits(model, data)
    assert not torch.allclose(tuned_logits, slot_logits(base, data))  # the adapter changed the model
    assert torch.equal(slot_logits(reloaded, data), tuned_logits)
    obs = observations(data)
    assert np.array_equal(reloaded.predict_actions(obs), model.predict_actions(obs))

    # merged and unmerged agree, and the merged policy is a deployable checkpoint
    merged = merge_lora(reloaded)
    assert type(merged) is OpenVLAPolicy
    assert torch.allclose(slot_logits(merged, data), tuned_logits, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    deployed = policies.load_pretrained(tmp_path / "merged")
    assert np.array_equal(deployed.predict_actions(obs), model.predict_actions(obs))


def test_lora_adapter_carries_the_l1_head(tmp_path):
    base = tiny(OpenVLAPolicy, decoding="parallel", action_chunk=2, action_head="l1")
    base.save_pretrained(tmp_path / "base")
    data = batch(chunk=2, seed=6)
    model = lora_train(apply_lora(policies.load_pretrained(tmp_path / "base")), data)
    assert any(".action_head.modules_to_save." in n and p.requires_grad for n, p in model.named_parameters())
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(policies.load_pretrained(tmp_path / "base"), tmp_path / "adapter")
    obs = observations(data)
    tuned = model.predict_actions(obs)
    assert not np.allclose(tuned, base.predict_actions(obs))
    np.testing.assert_array_equal(reloaded.predict_actions(obs), tuned)
    np.testing.assert_allclose(merge_lora(reloaded).predict_actions(obs), tuned, atol=1e-5)


@pytest.mark.gpu
def test_lora_trains_on_gpu_in_bf16_with_checkpointing():
    model = apply_lora(tiny(OpenVLAPolicy, gradient_checkpointing=True).cuda())
    data = batch(seed=6)
    first = model(data)[0].item()
    lora_train(model, data, steps=20, lr=1e-2)
    assert model(data)[0].item() < first
    assert model.predict_actions(observations(data)).shape == (4, 1, 7)
