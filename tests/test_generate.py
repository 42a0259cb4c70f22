"""Generation: cached decoding equals recomputation, batching, sampling, the router limit, chats that keep
their cache, and the CLI (parity with transformers' greedy generate and logits, images, interactive chat,
errors)."""
import dataclasses
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from hf_fixtures import make_qwen
from wings_fixtures import TINY_LLM, TINY_MHA_LLM, TINY_VISION, randomize_learner_b, strong_model, tiny_model
from wings_jax.convert.__main__ import main as convert_main
from wings_jax.checkpoint import save_model
from wings_jax.data.assemble import Prompt
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.data.tokenizer import build_local_qwen_tokenizer, load_tokenizer
from wings_jax.data.conversation import Turn
from wings_jax.inference import (ChatSession, Engine, GenerationError, Sampling, encode_chat, encode_chat_turn,
                                 joined, load_for_inference, sample_tokens, with_continuation)
from wings_jax.generate import main as generate_main
from wings_jax.model.learners import WingsConfig
from wings_jax.model.runtime import TEXT_CACHES, Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig

TOKENIZER_VOCAB = 512
SIZE, TOKENS = TINY_VISION.image_size, (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2


def make_prompt(length, num_images=0, seed=0, vocab=TINY_LLM.vocab_size):
    """A random prompt: 3 'system' tokens, then text with each image's slots after 2 more tokens."""
    rng = np.random.RandomState(seed)
    tokens = list(rng.randint(0, vocab, length))
    for k in range(num_images):
        at = 5 + k * (TOKENS + 2)
        tokens[at:at] = [IMAGE_TOKEN_ID] * TOKENS
    tokens = np.asarray(tokens, np.int32)
    text_mask = tokens != IMAGE_TOKEN_ID
    text_mask[:3] = False
    images = rng.uniform(-1, 1, (num_images, SIZE, SIZE, 3)).astype(np.float32)
    return Prompt(tokens, np.arange(len(tokens), dtype=np.int32), text_mask, images, np.ones(num_images, bool))


# Different lengths, text-only rows among image rows. The first four, generated alone, need only two
# shapes (bucket 16 without images, bucket 24 with one image): every new shape costs a compilation.
PROMPTS = [make_prompt(6, seed=1), make_prompt(13, 1, seed=2), make_prompt(14, seed=3), make_prompt(16, 1, seed=4),
           make_prompt(9, 2, seed=5)]
NEW = 10


def teacher_forced_argmax(engine, prompts, generations):
    """What greedy decoding must produce: argmax of the full forward over prompt + generated tokens."""
    full = [p._replace(tokens=np.concatenate([p.tokens, np.asarray(g.token_ids[:-1], np.int32)]),
                       positions=np.arange(len(p.tokens) + len(g.token_ids) - 1, dtype=np.int32),
                       text_mask=np.concatenate([p.text_mask, np.ones(len(g.token_ids) - 1, bool)]))
            for p, g in zip(prompts, generations)]
    return [np.argmax(logits[len(p.tokens) - 1:], axis=-1).tolist()
            for p, logits in zip(prompts, engine.logits(full))]


@pytest.mark.parametrize("llm", [TINY_LLM, TINY_MHA_LLM], ids=["gqa", "mha"])
@pytest.mark.parametrize("text_cache", TEXT_CACHES)
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_cached_greedy_equals_recomputation(stage, text_cache, llm):
    engine = Engine(strong_model(stage, Runtime(text_cache=text_cache), llm))
    cached = engine.generate(PROMPTS, NEW)
    recomputed = engine.generate(PROMPTS, NEW, recompute=True)
    assert [g.token_ids for g in cached] == [g.token_ids for g in recomputed]
    assert all(len(g.token_ids) == NEW and g.finish_reason == "length" for g in cached)
    if stage == "finetune":  # and both equal the plain forward's choices (one stage is enough: compile time)
        assert [g.token_ids for g in cached] == teacher_forced_argmax(engine, PROMPTS, cached)


@pytest.mark.parametrize("text_cache", TEXT_CACHES)
def test_batched_equals_one_by_one(text_cache):
    engine = Engine(strong_model(runtime=Runtime(text_cache=text_cache)))
    batched = engine.generate(PROMPTS, NEW)
    for prompt, together in zip(PROMPTS[:4], batched):
        assert engine.generate([prompt], NEW) == [together]


@pytest.mark.parametrize("text_cache", TEXT_CACHES)
def test_blocks_of_steps_on_device_equal_one_block(text_cache):
    """Blocks that end mid-generation (3 steps per dispatch) and rows that stop in different blocks give the
    tokens of a single block."""
    engine = Engine(strong_model(runtime=Runtime(text_cache=text_cache)))
    whole = engine.generate(PROMPTS, NEW)
    stop = whole[0].token_ids[4]
    engine.steps_per_dispatch = 3
    assert engine.generate(PROMPTS, NEW) == whole
    engine.steps_per_dispatch = NEW
    stopped = engine.generate(PROMPTS, NEW, stop_ids=[stop])
    engine.steps_per_dispatch = 3
    assert engine.generate(PROMPTS, NEW, stop_ids=[stop]) == stopped


def test_learners_change_what_is_generated():
    """The comparisons above would be vacuous if the learners added nothing."""
    active = Engine(strong_model()).generate(PROMPTS, NEW)
    silent = Engine(tiny_model(seed=3, randomize_b=False)).generate(PROMPTS, NEW)
    changed = [a != s for a, s in zip(active, silent)]
    assert changed[1] and changed[3]  # image rows: the visual learner (with the router's mix)
    assert changed[0] or changed[2]  # text-only rows: the textual learner


def test_stop_tokens_end_each_row_separately():
    engine = Engine(strong_model())
    free = engine.generate(PROMPTS, NEW)
    stop = free[0].token_ids[3]
    stopped = engine.generate(PROMPTS, NEW, stop_ids=[stop])
    assert stopped[0].token_ids == free[0].token_ids[:free[0].token_ids.index(stop)]
    for f, s in zip(free, stopped):
        if stop in f.token_ids:
            assert s.token_ids == f.token_ids[:f.token_ids.index(stop)] and s.finish_reason == "stop"
        else:
            assert s == f


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    engine = Engine(strong_model())
    warm = Sampling(temperature=2.0)
    first = engine.generate(PROMPTS, NEW, warm, seed=7)
    assert first == engine.generate(PROMPTS, NEW, warm, seed=7)
    assert first != engine.generate(PROMPTS, NEW, warm, seed=8)
    greedy = engine.generate(PROMPTS, NEW)
    assert first != greedy
    assert engine.generate(PROMPTS, NEW, Sampling(temperature=2.0, top_k=1), seed=7) == greedy
    assert engine.generate(PROMPTS, NEW, Sampling(temperature=2.0, top_p=1e-6), seed=7) == greedy


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    keys = jax.random.split(jax.random.key(0), 400)
    many = jax.jit(jax.vmap(sample_tokens, in_axes=(None, 0, None)))

    def draws(**kw):
        return set(np.asarray(many(logits, keys, Sampling(temperature=1.0, **kw).values())).ravel().tolist())

    assert draws() == {0, 1, 2, 3, 4}
    assert draws(top_k=2) == {1, 3}
    assert draws(top_p=0.75) == {1, 3, 4}  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.15
    assert draws(top_k=2, top_p=0.5) == {1}  # top-p over the top-k renormalised: 0.4 / 0.7 >= 0.5


def test_sampling_draws_the_tokens_of_a_full_sort():
    """Candidates from top_k (top-k within the bound), no ordering (neither), a sort (top-k past the bound,
    or top-p alone): the same tokens for the same keys as sorting the whole vocabulary."""
    logits = jax.random.normal(jax.random.key(1), (3, 300)) * 3
    keys = jax.random.split(jax.random.key(2), 64)
    ours = jax.jit(jax.vmap(sample_tokens, in_axes=(None, 0, None)))
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from decode_steps import sorted_cutoff_sampling  # the oracle: how sampling worked before candidates

    oracle = jax.jit(jax.vmap(sorted_cutoff_sampling, in_axes=(None, 0, None)))
    for kw in (dict(), dict(top_k=1), dict(top_k=10), dict(top_k=64), dict(top_k=65), dict(top_k=200, top_p=0.8),
               dict(top_p=0.9), dict(top_k=10, top_p=0.5)):
        settings = Sampling(temperature=1.5, **kw).values()
        np.testing.assert_array_equal(ours(logits, keys, settings), oracle(logits, keys, settings), err_msg=str(kw))


def test_new_sampling_settings_never_recompile():
    engine = Engine(strong_model())
    engine.generate(PROMPTS[:2], NEW)
    steps = (engine._steps.prefill, engine._steps.extend_block)
    compiled = [step._cache_size() for step in steps]
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_k=500),
               dict(temperature=1.0, top_p=0.9), dict(temperature=2.0, top_k=3, top_p=0.5)):
        engine.generate(PROMPTS[:2], NEW, Sampling(**kw), seed=1)
    assert [step._cache_size() for step in steps] == compiled


def test_router_limit_and_bad_settings_are_refused():
    engine = Engine(tiny_model(seed=3))  # router_max_len 128
    with pytest.raises(GenerationError, match="router_max_len"):
        engine.generate([make_prompt(100)], 40)
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0)):
        with pytest.raises(GenerationError, match=next(iter(bad))):
            Sampling(**bad)


def test_reference_mixing_decodes_by_recomputation():
    """The released textual learner sees later text, so each token comes from the sequence so far only."""
    engine = Engine(strong_model(mixing="reference"))
    prompts = [make_prompt(13, 1, seed=5), make_prompt(10, seed=6)]  # 17 and 10 tokens: one bucket throughout
    result = engine.generate(prompts, 4)
    for k in range(4):
        so_far = [p._replace(tokens=np.concatenate([p.tokens, np.asarray(g.token_ids[:k], np.int32)]),
                             positions=np.arange(len(p.tokens) + k, dtype=np.int32),
                             text_mask=np.concatenate([p.text_mask, np.ones(k, bool)]))
                  for p, g in zip(prompts, result)]
        assert [int(np.argmax(logits[-1])) for logits in engine.logits(so_far)] == [g.token_ids[k] for g in result]
    with pytest.raises(GenerationError, match="recompute"):
        engine.generate(prompts, 4, recompute=False)


# ---------------------------------------------------------------------------------------------
# chats


def make_turn(length, num_images=0, seed=0):
    """A random later turn: every token after the system turn, each image's slots after 5 tokens."""
    prompt = make_prompt(length, num_images, seed)
    return prompt._replace(text_mask=prompt.tokens != IMAGE_TOKEN_ID)


def chat(engine, turns, keep_cache, new=NEW, stop_ids=()):
    session = ChatSession(engine, keep_cache)
    return session, [session.reply(turn, new, stop_ids=stop_ids) for turn in turns]


# stage, kv heads (4: MHA), causal_images, the turn that adds an image (the first turn always has one)
CHATS = [("finetune", 2, False, None), ("pretrain", 4, False, None), ("finetune", 4, True, 1),
         ("pretrain", 2, False, 1), ("finetune", 2, True, 2)]


@pytest.mark.parametrize("stage,kv_heads,causal,image_turn", CHATS)
def test_chat_keeps_its_cache_and_replies_as_a_reread(stage, kv_heads, causal, image_turn):
    """Three turns: the session that keeps its cache (re-reading only at turns that add an image without
    causal_images; with it, extending by the image too) replies token for token as one that re-reads the
    conversation's tokens every turn, whether a reply ends by length (its last token not yet in the cache) or at
    a stop token."""
    engine = Engine(strong_model(stage, llm=dataclasses.replace(TINY_LLM, num_kv_heads=kv_heads),
                                  causal_images=causal))
    turns = [make_prompt(13, 1, seed=11)] + [make_turn(9, int(k == image_turn), seed=11 + k) for k in (1, 2)]
    kept, replies = chat(engine, turns, keep_cache=True)
    reread, expected = chat(engine, turns, keep_cache=False)
    assert replies == expected and all(r.finish_reason == "length" for r in replies)
    rereads = 1 if image_turn is None or causal else 2  # the first turn's prefill, and a stale cache's re-read
    assert kept.rereads == rereads and reread.rereads == 3
    if causal:  # the image-token room: the two images, bucketed by images
        assert kept._carry.cache.image_tokens == 2 * TOKENS
    conversation = [turns[0].tokens, replies[0].token_ids, turns[1].tokens, replies[1].token_ids, turns[2].tokens]
    np.testing.assert_array_equal(kept.prompt.tokens, np.concatenate(conversation))
    stop = replies[0].token_ids[NEW // 2]
    kept, replies = chat(engine, turns, keep_cache=True, stop_ids=[stop])
    assert replies == chat(engine, turns, keep_cache=False, stop_ids=[stop])[1]
    assert replies[0].finish_reason == "stop" and kept.rereads == rereads


def test_chat_grows_its_cache_and_refuses_what_does_not_fit():
    """Long turns outgrow the cache (grown, not re-read); a turn past the router's positions is refused with
    the conversation unchanged, and the chat goes on from its cache."""
    engine = Engine(strong_model())  # router_max_len 128
    turns = [make_prompt(13, 1, seed=21), make_turn(30, seed=22), make_turn(40, seed=23)]
    kept, replies = chat(engine, turns, keep_cache=True)
    assert replies == chat(engine, turns, keep_cache=False)[1]
    assert kept.rereads == 1 and kept._carry.cache.max_length == 128  # 32 slots at turn 0, 96 at turn 1
    prompt = kept.prompt
    with pytest.raises(GenerationError, match="router_max_len"):
        kept.reply(make_turn(9, seed=24), 40)
    assert kept.prompt is prompt and kept._carry is not None
    kept.reply(make_turn(5, seed=25), 4)
    assert kept.rereads == 1


def test_chat_with_a_reference_model_rereads_every_turn():
    engine = Engine(strong_model(mixing="reference"))
    session, replies = chat(engine, [make_prompt(13, 1, seed=5), make_turn(4, seed=6)], keep_cache=True, new=4)
    assert session.rereads == 2
    assert engine.generate([session.prompt], 4) == [replies[-1]]


def test_next_turn_tokens_are_those_of_a_fresh_encoding(vision_checkpoint):
    """A reply's ids, then the next turn's tokens, are the whole conversation's encoding when the reply's text
    round-trips (closing, user turn with an image, assistant header)."""
    ckpt, image = vision_checkpoint
    tokenizer = load_tokenizer(ckpt)
    cfg = WingsModelConfig(llm=TINY_LLM, vision=TINY_VISION)
    first = encode_chat(cfg, tokenizer, [Turn("user", "<image>\nWhat is it?")], [image])
    for reply in ("A cat.", "Two lines,\n\nthen  spaces ", " leading space\n"):
        ids = tokenizer.encode(reply, add_special_tokens=False)
        assert tokenizer.decode(ids) == reply
        ours = joined(with_continuation(first, ids), encode_chat_turn(cfg, tokenizer, "<image>\nAnd this?", [image]))
        fresh = encode_chat(cfg, tokenizer, [Turn("user", "<image>\nWhat is it?"), Turn("assistant", reply),
                                             Turn("user", "<image>\nAnd this?")], [image, image])
        for ours_field, fresh_field in zip(ours, fresh):
            np.testing.assert_array_equal(ours_field, fresh_field)


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random transformers Qwen2 with the local tokenizer, imported (stage finetune, short router)."""
    root = tmp_path_factory.mktemp("hf")
    llm_dir, ckpt = str(root / "qwen"), str(root / "ckpt")
    hf_model = make_qwen(llm_dir, "qwen2.5", vocab_size=TOKENIZER_VOCAB, seed=1)
    tokenizer = build_local_qwen_tokenizer(llm_dir, TOKENIZER_VOCAB)
    assert convert_main(["import-hf", "--llm", llm_dir, "--out", ckpt, "--stage", "finetune",
                         "--router-max-len", "64"]) == 0
    return hf_model, tokenizer, ckpt


def save_vision_checkpoint(directory, seed=0, stage="finetune", kv_heads=TINY_LLM.num_kv_heads, causal_images=False):
    """A tiny Wings model with a vision tower and active learners, saved with the local tokenizer."""
    tokenizer_dir = os.path.join(directory, "tokenizer")
    build_local_qwen_tokenizer(tokenizer_dir, TOKENIZER_VOCAB)
    cfg = WingsModelConfig(llm=dataclasses.replace(TINY_LLM, vocab_size=TOKENIZER_VOCAB, num_kv_heads=kv_heads),
                           vision=TINY_VISION, wings=WingsConfig(stage=stage, lora_rank=8, router_max_len=256,
                                                                 causal_images=causal_images))
    model = WingsModel(cfg, Runtime(), rngs=nnx.Rngs(seed))
    randomize_learner_b(model, seed)
    ckpt = os.path.join(directory, "ckpt")
    save_model(ckpt, model, tokenizer_src=tokenizer_dir)
    return ckpt


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    image = str(root / "picture.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 30, 3), np.uint8)).save(image)
    return save_vision_checkpoint(str(root)), image


def test_inference_dtype_defaults_to_bfloat16_on_accelerators_only(hf_checkpoint, monkeypatch):
    _, _, ckpt = hf_checkpoint

    def param_dtypes(dtype=None):
        model, _ = load_for_inference(ckpt, dtype)
        return {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}

    assert param_dtypes() == {"float32"}  # this machine is a CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert param_dtypes() == {"bfloat16"}
    assert param_dtypes("float32") == {"float32"}


def _run(capsys, argv):
    rc = generate_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_matches_transformers_generate_and_logits(hf_checkpoint, capsys, tmp_path):
    hf_model, tokenizer, ckpt = hf_checkpoint
    question = "What is 3 plus 4?"
    logits_file = str(tmp_path / "logits.npy")
    rc, out, err = _run(capsys, ["--ckpt", ckpt, "--prompt", question, "--json", "--max-new-tokens", "20",
                                 "--ignore-eos", "--save-logits", logits_file])
    assert rc == 0, err
    reply = json.loads(out)
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True, tokenize=True)["input_ids"]
    assert reply["prompt_token_ids"] == expected_prompt
    ids = torch.tensor([expected_prompt])
    with torch.no_grad():
        hf_out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                   min_new_tokens=20, eos_token_id=None, pad_token_id=0)
        hf_logits = hf_model(ids).logits[0].numpy()
    assert reply["generated_token_ids"] == hf_out[0, len(expected_prompt):].tolist()
    assert reply["text"] == tokenizer.decode(reply["generated_token_ids"], skip_special_tokens=True)
    logits = np.load(logits_file)
    assert logits.dtype == np.float32 and logits.shape == (len(expected_prompt), TOKENIZER_VOCAB)
    np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=0)


class _Recorder(io.StringIO):
    """stdout that keeps each write separately."""

    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)
        return super().write(text)


def test_cli_streams_the_reply_in_pieces(hf_checkpoint, capsys, monkeypatch):
    _, _, ckpt = hf_checkpoint
    common = ["--ckpt", ckpt, "--prompt", "What is 3 plus 4?", "--max-new-tokens", "20", "--ignore-eos"]
    rc, out, err = _run(capsys, common + ["--json"])
    assert rc == 0, err
    text = json.loads(out)["text"]
    stdout = _Recorder()
    monkeypatch.setattr("sys.stdout", stdout)
    assert generate_main(common) == 0
    pieces = [p for p in stdout.pieces if p]
    assert len(pieces) > 2 and "".join(pieces) == text + "\n"


def test_cli_errors_name_the_problem(hf_checkpoint, vision_checkpoint, capsys, tmp_path):
    _, _, ckpt = hf_checkpoint
    missing = str(tmp_path / "nowhere")
    rc, _, err = _run(capsys, ["--ckpt", missing, "--prompt", "hi"])
    assert rc != 0 and missing in err
    rc, _, err = _run(capsys, ["--ckpt", ckpt, "--prompt", "hi", "--image", vision_checkpoint[1]])
    assert rc != 0 and "no vision tower" in err and ckpt in err
    rc, _, err = _run(capsys, ["--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "60"])
    assert rc != 0 and "router_max_len" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    for image in (broken, tmp_path / "missing.png"):
        rc, _, err = _run(capsys, ["--ckpt", vision_checkpoint[0], "--prompt", "hi", "--image", str(image)])
        assert rc != 0 and str(image) in err
    rc, _, err = _run(capsys, ["--ckpt", ckpt, "--save-logits", str(tmp_path / "x.npy")])
    assert rc != 0 and "--save-logits needs --prompt" in err


def test_cli_relative_checkpoint_path_and_default_length_capped(hf_checkpoint, capsys, monkeypatch):
    """The README's form: a relative --ckpt, no --max-new-tokens. The default (256) exceeds the router's 64
    positions, so it is capped with a note; an explicit length that does not fit is still refused."""
    _, _, ckpt = hf_checkpoint
    monkeypatch.chdir(os.path.dirname(ckpt))
    relative = os.path.basename(ckpt)
    rc, out, err = _run(capsys, ["--ckpt", relative, "--prompt", "What is 3 plus 4?", "--json", "--ignore-eos"])
    assert rc == 0, err
    reply = json.loads(out)
    room = 64 - len(reply["prompt_token_ids"])
    assert len(reply["generated_token_ids"]) == room and f"at most {room} new tokens" in err
    rc, _, err = _run(capsys, ["--ckpt", relative, "--prompt", "What is 3 plus 4?", "--max-new-tokens", "256"])
    assert rc != 0 and "router_max_len" in err


def test_cli_image_prompt_and_interactive_chat(vision_checkpoint, capsys, monkeypatch):
    ckpt, image = vision_checkpoint
    common = ["--ckpt", ckpt, "--json", "--max-new-tokens", "5", "--ignore-eos"]
    # 71 prompt tokens, and about 90 at the second turn: one length bucket (65-96), one compilation.
    question = "Look at the picture and describe the colours and the shapes that you see in one sentence."
    rc, out, err = _run(capsys, common + ["--prompt", question, "--image", image])
    assert rc == 0, err
    single = json.loads(out)
    assert single["prompt_token_ids"].count(IMAGE_TOKEN_ID) == TOKENS and len(single["generated_token_ids"]) == 5

    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image}\n{question}\nWhy?\n/exit\nignored\n"))
    rc, out, err = _run(capsys, common)
    assert rc == 0, err
    first, second = [json.loads(line) for line in out.splitlines()]
    assert first == single  # the same conversation so far, so the same prompt and greedy answer
    # The second prompt re-reads the first exchange (image, question, answer) before the new question.
    assert second["prompt_token_ids"].count(IMAGE_TOKEN_ID) == TOKENS
    text = load_tokenizer(ckpt).decode([t for t in second["prompt_token_ids"] if t >= 0])
    exchange = f"{question}<|im_end|>\n<|im_start|>assistant\n{first['text']}<|im_end|>\n"
    assert exchange + "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n" in text


def _chat_both_ways(capsys, monkeypatch, argv, stdin):
    """The interactive chat's JSON replies and the number of turns it re-read: {keep_cache: (replies, rereads)}."""
    runs = {}
    for keep in (True, False):
        sessions = []
        monkeypatch.setattr("wings_jax.generate.ChatSession",
                            lambda engine, keep=keep: sessions.append(ChatSession(engine, keep)) or sessions[-1])
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        rc, out, err = _run(capsys, argv)
        assert rc == 0, err
        runs[keep] = [json.loads(line) for line in out.splitlines()], sessions[0].rereads
    return runs


@pytest.mark.parametrize("stage,kv_heads,causal", [("finetune", 2, False), ("pretrain", 4, True)])
def test_cli_interactive_chat_keeps_its_cache(stage, kv_heads, causal, tmp_path, capsys, monkeypatch):
    """Three messages (an image at the first, a text-only one, an image again), with the cache kept and with
    every turn re-read: the same replies; each prompt is the previous one, its reply's ids, then the turn. The
    kept cache re-reads at the second image only without causal_images."""
    ckpt = save_vision_checkpoint(str(tmp_path), seed=1, stage=stage, kv_heads=kv_heads, causal_images=causal)
    image = str(tmp_path / "picture.png")
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (30, 40, 3), np.uint8)).save(image)
    stdin = f"/image {image}\nWhat is in the picture?\nWhy?\n/image {image}\nAnd in this one?\n"
    runs = _chat_both_ways(capsys, monkeypatch, ["--ckpt", ckpt, "--json", "--max-new-tokens", "6", "--ignore-eos"],
                           stdin)
    (kept, kept_rereads), (reread, reread_rereads) = runs[True], runs[False]
    assert kept == reread and len(kept) == 3
    assert (kept_rereads, reread_rereads) == (1 if causal else 2, 3)  # the text-only turn extended the cache
    for before, after in zip(kept, kept[1:]):
        n = len(before["prompt_token_ids"]) + len(before["generated_token_ids"])
        assert after["prompt_token_ids"][:n] == before["prompt_token_ids"] + before["generated_token_ids"]
    assert kept[2]["prompt_token_ids"].count(IMAGE_TOKEN_ID) == 2 * TOKENS
