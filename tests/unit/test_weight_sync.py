"""What PPO sends its rollout engines under LoRA, on CPU tensors: the merged model (computed out of place, so
the frozen base never changes) or the adapter alone."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from humor_ray.rl import ppo

pytestmark = pytest.mark.timeout(300)


def lora_policy(dtype) -> torch.nn.Module:
    """A two-layer Llama with a LoRA adapter on every linear layer, its B matrices random (a trained adapter)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    return model


def frozen(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if "lora_" not in name}


def test_merged_weight_is_the_base_plus_the_scaled_product_in_a_new_tensor():
    torch.manual_seed(1)
    weight, a, b = torch.randn(6, 4).bfloat16(), torch.randn(2, 4).bfloat16(), torch.randn(6, 2).bfloat16()
    kept = weight.clone()
    merged = ppo.merged_lora_weight(weight, a, b, 0.5)
    assert merged.dtype == torch.bfloat16 and merged.data_ptr() != weight.data_ptr()
    assert torch.equal(weight, kept)
    exact = weight.double() + 0.5 * b.double() @ a.double()
    assert torch.allclose(merged.double(), exact, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding
    # A Conv1D-style layer stores its weight transposed (PEFT's fan_in_fan_out).
    assert torch.equal(ppo.merged_lora_weight(weight.T, a, b, 0.5, fan_in_fan_out=True), merged.T)


def test_many_full_syncs_leave_the_bf16_base_and_the_reference_bit_identical():
    policy = lora_policy(torch.bfloat16)
    base = frozen(policy)
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), policy.disable_adapter():
        reference = policy(input_ids=tokens).logits
    for _ in range(100):
        weights = ppo.policy_weights(policy)
    after = frozen(policy)
    changed = [name for name in base if not torch.equal(base[name], after[name])]
    assert not changed, f"{len(changed)} frozen tensors changed, e.g. {changed[:3]}"
    with torch.no_grad(), policy.disable_adapter():
        assert torch.equal(policy(input_ids=tokens).logits, reference)
    assert weights.lora is None and not any("lora_" in name or "base_layer" in name for name in weights.tensors)


def test_the_merged_weights_are_the_policy_with_its_adapter():
    policy = lora_policy(torch.float32)
    weights = ppo.policy_weights(policy)
    plain = LlamaForCausalLM(policy.base_model.model.config)
    missing, unexpected = plain.load_state_dict(weights.tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        adapted = policy(input_ids=tokens).logits
        with policy.disable_adapter():
            base = policy(input_ids=tokens).logits
        merged = plain(input_ids=tokens).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-3)  # the adapter does change the outputs


def test_an_adapter_sync_holds_the_adapter_alone():
    policy = lora_policy(torch.float32)
    weights = ppo.policy_weights(policy, adapter=True)
    assert weights.lora.r == 8 and weights.lora.lora_alpha == 16
    assert weights.tensors and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in weights.tensors)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights.tensors
    lora_b = dict(policy.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert torch.equal(weights.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], lora_b)
    full = ppo.policy_weights(policy)
    assert weights.nbytes * 4 < full.nbytes  # r=8 on a 64-wide model; megabytes against gigabytes at 7B


def test_weight_sync_options(tmp_path):
    base = dict(output_dir=str(tmp_path), dataset_dir=str(tmp_path), reward_model="builtin:vowel_share")
    assert ppo.Config(**base, lora_r=8).syncs_adapter()
    assert not ppo.Config(**base, lora_r=8, weight_sync="full").syncs_adapter()
    assert not ppo.Config(**base).syncs_adapter()  # no LoRA: the full model
    with pytest.raises(ValueError, match="--lora_r 1024: vLLM serves LoRA ranks up to 512"):
        ppo.Config(**base, lora_r=1024)
    ppo.Config(**base, lora_r=1024, weight_sync="full")
    with pytest.raises(ValueError, match="--weight_sync"):
        ppo.Config(**base, lora_r=8, weight_sync="delta")
