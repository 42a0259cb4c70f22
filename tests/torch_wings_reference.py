"""An independent PyTorch rendering of the released Wings forward (spec section 5), for one sample.

It reads a checkpoint in the released layout (tests build tiny random ones) and computes logits the
way the original code does: learners added twice after routing, text features from positions
[system_prompt_length, image start) + [image end, L), the textual learner masked by feature index,
no mask in the visual learner, and a blank image for text-only samples. Written from the spec for
the tests; it shares no code with wings_jax.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import SiglipVisionConfig, SiglipVisionModel

VISION = "model.vision_tower.vision_tower.vision_model."
IMAGE_TOKEN_ID = -200


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _rope_tables(head_dim, theta, length):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(length).float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):  # x (heads, T, D); cos/sin (T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _vision_module(vision):
    return getattr(vision, "vision_model", vision)  # transformers 4 nests the tower, 5 does not


class ReleasedWings:
    def __init__(self, directory: str):
        with open(os.path.join(directory, "config.json")) as f:
            self.cfg = json.load(f)
        self.w = {k: v.float() for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}
        c = self.cfg
        self.hidden, self.heads = c["hidden_size"], c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads", self.heads)
        self.head_dim = self.hidden // self.heads
        self.theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
        self.eps = c["rms_norm_eps"]
        self.sys_len = c["system_prompt_length"]
        self.tokens_per_image = c["image_token_length"]
        self.router = c["wings_router_type"] == "linear"
        v = c["vision_config"]
        vision_cfg = SiglipVisionConfig(**{k: v[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "layer_norm_eps", "num_channels")}, hidden_act="gelu_pytorch_tanh")
        self.vision = SiglipVisionModel(vision_cfg).eval()
        state = {k[len(VISION):]: t for k, t in self.w.items() if k.startswith(VISION)}
        missing, unexpected = _vision_module(self.vision).load_state_dict(state, strict=False)
        assert not unexpected and all("head" in m for m in missing), (missing, unexpected)

    def image_features(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.vision(pixel_values=pixels_nchw, output_hidden_states=True).hidden_states[-1]
        w = self.w
        h = F.linear(feats, w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"])
        return F.linear(F.gelu(h), w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"])[0]

    def _learner(self, prefix, query, feats, q_pos, k_pos, mask, cos, sin):
        w = self.w

        def proj(name, x):
            return F.linear(F.linear(x, w[f"{prefix}.{name}_proj.0.weight"]), w[f"{prefix}.{name}_proj.1.weight"])

        q = (query + proj("q", query)).view(-1, self.heads, self.head_dim).transpose(0, 1)
        k = (feats + proj("k", feats)).view(-1, self.heads, self.head_dim).transpose(0, 1)
        v = (feats + proj("v", feats)).view(-1, self.heads, self.head_dim).transpose(0, 1)
        q, k = _rotate(q, cos[q_pos], sin[q_pos]), _rotate(k, cos[k_pos], sin[k_pos])
        scores = q @ k.transpose(1, 2) / self.head_dim ** 0.5
        if mask is not None:
            scores = scores + mask
        out = torch.softmax(scores.float(), -1) @ v
        return proj("o", out.transpose(0, 1).reshape(-1, self.hidden))

    def logits(self, input_ids: list[int], pixels_nchw: torch.Tensor | None) -> np.ndarray:
        """``input_ids`` with at most one IMAGE_TOKEN_ID; ``pixels_nchw`` (1, 3, S, S) or None (text only)."""
        w, t_img = self.w, self.tokens_per_image
        embed = w["model.embed_tokens.weight"]
        if IMAGE_TOKEN_ID in input_ids:
            at = input_ids.index(IMAGE_TOKEN_ID)
            image = self.image_features(pixels_nchw)
            x = torch.cat([embed[input_ids[:at]], image, embed[input_ids[at + 1:]]])
            begin, end = at, at + t_img
        else:  # the collator gives text-only samples an all-zero pixel tensor
            size = self.cfg["vision_config"]["image_size"]
            image = self.image_features(torch.zeros(1, 3, size, size))
            x = embed[input_ids]
            begin, end = 0, t_img
        length = x.shape[0]
        positions = torch.arange(length)
        image_pos = torch.arange(begin, end)
        text_pos = positions if begin == 0 else torch.cat([positions[self.sys_len:begin], positions[end:]])
        text_feats = x[text_pos]
        first_visual = 1.0
        if length < image.shape[0]:  # shorter than one image: blank features truncated, first add masked
            image, image_pos, first_visual = image[:length], image_pos[:length], 0.0
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        text_mask = causal[:, : text_feats.shape[0]]  # sliced by feature index, as released
        cos, sin = _rope_tables(self.head_dim, self.theta, length)
        h = x
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = _rms(h, w[p + "input_layernorm.weight"], self.eps)
            q = F.linear(a, w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"])
            k = F.linear(a, w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"])
            v = F.linear(a, w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"])
            q = _rotate(q.view(length, self.heads, -1).transpose(0, 1), cos, sin)
            k = _rotate(k.view(length, self.kv_heads, -1).transpose(0, 1), cos, sin)
            v = v.view(length, self.kv_heads, -1).transpose(0, 1)
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            probs = torch.softmax(q @ k.transpose(1, 2) / self.head_dim ** 0.5 + causal, -1)
            attn = (probs @ v).transpose(0, 1).reshape(length, -1)
            h = h + F.linear(attn, w[p + "self_attn.o_proj.weight"])
            if p + "attn_pool.q_proj.0.weight" not in w:
                pass  # a layer outside attn_layers_idx is a plain decoder layer
            elif self.router:
                visual = self._learner(p + "attn_pool", h, image, positions, image_pos, None, cos, sin)
                textual = self._learner(p + "attn_t_pool", h, text_feats, positions, text_pos, text_mask, cos, sin)
                router_w = w[p + "reweight_module.linear.weight"][:, :length]
                weights = torch.softmax(F.silu(probs.sum(0) @ router_w.T + w[p + "reweight_module.linear.bias"]), -1)
                h = h + first_visual * weights[:, :1] * visual + weights[:, 1:] * textual
                h = h + weights[:, :1] * visual + weights[:, 1:] * textual
            else:
                h = h + self._learner(p + "attn_pool", h, image, positions, image_pos, None, cos, sin)
            m = _rms(h, w[p + "post_attention_layernorm.weight"], self.eps)
            gate = F.linear(m, w[p + "mlp.gate_proj.weight"])
            up = F.linear(m, w[p + "mlp.up_proj.weight"])
            h = h + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])
        h = _rms(h, w["model.norm.weight"], self.eps)
        return F.linear(h, w["lm_head.weight"]).detach().numpy()
