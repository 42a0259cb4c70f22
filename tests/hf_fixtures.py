"""Tiny random Hugging Face models, built and saved locally (nothing is downloaded)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

QWEN_SHAPES = {
    # Qwen1.5-like: as many kv heads as heads, untied lm_head
    "qwen1.5": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1_000_000.0),
    # Qwen2.5-like: grouped-query attention
    "qwen2.5": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10_000.0),
    # tied embeddings (the small Qwen2/2.5 models)
    "tied": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0),
}


def make_qwen(directory, shape: str = "qwen1.5", vocab_size: int = 160, seed: int = 0) -> Qwen2ForCausalLM:
    """Saves a random Qwen2ForCausalLM (safetensors) to ``directory`` and returns it in eval mode."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-6,
                         **QWEN_SHAPES[shape])
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # break the symmetry of HF's zero-initialised biases so they are tested too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.02)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model


def right_padded_batch(lengths, total: int, vocab_size: int, seed: int = 0):
    """Token ids (B, total) and a 0/1 attention mask with the given valid lengths."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab_size, (len(lengths), total)).astype(np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.float().numpy()
