"""ChatML formatting: token ids vs the tokenizer's chat template, label masking, images, bad records."""
import os

import numpy as np
import pytest

from wings_jax.data import (
    IGNORE_ID,
    IMAGE_TOKEN_ID,
    BadRecordError,
    ChatFormatter,
    Turn,
    build_local_qwen_tokenizer,
    encode_prompt,
    load_tokenizer,
    preprocess_image,
)
from wings_jax.data import tokenizer as tokenizer_module
from wings_jax.data.conversation import turns_from_llava

T = 5  # slots per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_local_qwen_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=512)


def _template_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _messages(turns):
    return [{"role": t.role, "content": t.text} for t in turns]


CONVERSATIONS = [
    [Turn("user", "What colour is the image?"), Turn("assistant", "It is red.")],
    [Turn("user", "What is 3 plus 4?"), Turn("assistant", "7"), Turn("user", "And 6 times 7?"),
     Turn("assistant", "6 times 7 is 42.")],
    [Turn("system", "Answer briefly."), Turn("user", "Copy this word: apple."), Turn("assistant", "apple")],
    # whitespace at the edges of answers, newlines, non-ASCII text, an empty answer
    [Turn("user", "  spaced question \n"), Turn("assistant", "\n\nleading newlines and trailing  "),
     Turn("user", "Ünïcödé — 日本語?"), Turn("assistant", "")],
]


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_tokens_equal_chat_template(tok, turns):
    encoded = ChatFormatter(tok, tokens_per_image=T).encode(turns, 0)
    assert encoded.tokens.dtype == np.int32
    assert encoded.tokens.tolist() == _template_ids(tok, _messages(turns))


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_labels_cover_exactly_the_answers(tok, turns):
    encoded = ChatFormatter(tok, tokens_per_image=T).encode(turns, 0)
    labelled = encoded.labels != IGNORE_ID
    np.testing.assert_array_equal(encoded.labels[labelled], encoded.tokens[labelled])
    # Contiguous labelled runs, one per assistant turn, each decoding to "answer<|im_end|>" plus the
    # newline when another turn follows.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], labelled.astype(int), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))
    answers = [i for i, t in enumerate(turns) if t.role == "assistant"]
    assert len(runs) == len(answers)
    for (a, b), i in zip(runs, answers):
        expected = turns[i].text + "<|im_end|>" + ("\n" if i + 1 < len(turns) else "")
        assert tok.decode(encoded.tokens[a:b].tolist()) == expected
        # The role header right before the answer is never trained.
        assert tok.decode(encoded.tokens[:a].tolist()).endswith("<|im_start|>assistant\n")


def test_default_and_custom_system_prompt(tok):
    turns = [Turn("user", "hi"), Turn("assistant", "hello")]
    custom = ChatFormatter(tok, tokens_per_image=T, system_prompt="Be terse.").encode(turns, 0)
    expected = _template_ids(tok, [{"role": "system", "content": "Be terse."}] + _messages(turns))
    assert custom.tokens.tolist() == expected
    # A record's own system turn wins over the configured prompt.
    own = [Turn("system", "Record's own.")] + turns
    encoded = ChatFormatter(tok, tokens_per_image=T, system_prompt="Be terse.").encode(own, 0)
    assert encoded.tokens.tolist() == _template_ids(tok, _messages(own))


def test_system_end_and_text_mask(tok):
    turns = [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")]
    encoded = ChatFormatter(tok, tokens_per_image=T).encode(turns, 1)
    system_ids = _template_ids(tok, [{"role": "system", "content": "You are a helpful assistant."}])
    assert encoded.system_end == len(system_ids)
    assert encoded.tokens[: encoded.system_end].tolist() == system_ids
    mask = encoded.text_mask
    assert not mask[: encoded.system_end].any()
    assert not mask[encoded.tokens == IMAGE_TOKEN_ID].any()
    assert mask[encoded.system_end:][encoded.tokens[encoded.system_end:] != IMAGE_TOKEN_ID].all()


def test_multi_image_interleaving(tok):
    turns = [Turn("user", "First <image> then"), Turn("assistant", "ok"),
             Turn("user", "<image><image>\nboth?"), Turn("assistant", "yes")]
    encoded = ChatFormatter(tok, tokens_per_image=T).encode(turns, 3)
    tokens = encoded.tokens
    slots = tokens == IMAGE_TOKEN_ID
    assert slots.sum() == 3 * T
    assert (encoded.labels[slots] == IGNORE_ID).all()
    for start in encoded.image_starts:
        assert (tokens[start:start + T] == IMAGE_TOKEN_ID).all()
    assert encoded.image_starts[1] + T == encoded.image_starts[2]  # adjacent placeholders: adjacent runs
    # The text around the runs is the rendered conversation with each placeholder removed, in order.
    pieces, prev = [], 0
    for start in encoded.image_starts:
        pieces.append(tok.decode(tokens[prev:start].tolist()))
        prev = start + T
    pieces.append(tok.decode(tokens[prev:].tolist()))
    rendered = tok.apply_chat_template(_messages(turns), tokenize=False)
    assert pieces == rendered.split("<image>")


def test_encode_prompt_for_generation(tok):
    turns = [{"role": "user", "content": "<image>\nWhat colour is the image?"}]
    image = np.full((10, 20, 3), 200, np.uint8)
    prompt = encode_prompt(tok, turns, [image], image_size=14, tokens_per_image=T)
    # The chat template's tokens with a generation prompt, plus the image run in place of the placeholder.
    start = int(np.argmax(prompt.tokens == IMAGE_TOKEN_ID))
    assert (prompt.tokens[start:start + T] == IMAGE_TOKEN_ID).all()
    without = np.concatenate([prompt.tokens[:start], prompt.tokens[start + T:]]).tolist()
    text_turns = [{"role": "user", "content": "\nWhat colour is the image?"}]
    assert without == _template_ids(tok, text_turns, add_generation_prompt=True)
    assert tok.decode(prompt.tokens[start + T:].tolist()).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.positions.tolist() == list(range(len(prompt.tokens)))
    assert prompt.text_mask.tolist() == ChatFormatter(tok, tokens_per_image=T).encode(
        turns, 1, add_generation_prompt=True).text_mask.tolist()
    assert prompt.images.shape == (1, 14, 14, 3) and prompt.images.dtype == np.float32
    np.testing.assert_array_equal(prompt.images[0], preprocess_image(image, 14))
    assert prompt.image_mask.tolist() == [True]
    with pytest.raises(BadRecordError, match="end with a user turn"):
        encode_prompt(tok, turns + [{"role": "assistant", "content": "x"}], [image], image_size=14,
                      tokens_per_image=T)


@pytest.mark.parametrize("turns, images, kind, message", [
    ([Turn("user", "<image> and <image>"), Turn("assistant", "a")], 1, "placeholder_mismatch", "2 <image>"),
    ([Turn("user", "no placeholder"), Turn("assistant", "a")], 1, "placeholder_mismatch", "0 <image>"),
    ([Turn("user", "q"), Turn("assistant", "<image>")], 1, "placeholder_mismatch", "user turns"),
    ([], 0, "empty_conversation", "empty"),
    ([Turn("system", "s")], 0, "empty_conversation", "only a system"),
    ([Turn("assistant", "a"), Turn("user", "q")], 0, "bad_roles", "alternate"),
    ([Turn("user", "q"), Turn("user", "q2"), Turn("assistant", "a")], 0, "bad_roles", "alternate"),
    ([Turn("user", "q"), Turn("assistant", "a"), Turn("system", "s")], 0, "bad_roles", "alternate"),
    ([Turn("user", "q")], 0, "bad_roles", "no answer"),
    ([Turn("user", "q"), Turn("robot", "a")], 0, "bad_roles", "robot"),
    ([Turn("user", 42), Turn("assistant", "a")], 0, "bad_value", "int"),
    ([Turn("user", "q"), Turn("assistant", None)], 0, "bad_value", "NoneType"),
])
def test_bad_conversations(tok, turns, images, kind, message):
    with pytest.raises(BadRecordError, match=message) as info:
        ChatFormatter(tok, tokens_per_image=T).encode(turns, images)
    assert info.value.kind == kind


def test_llava_records():
    turns, images = turns_from_llava({"id": "1", "image": "a.jpg", "conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]})
    assert turns == [Turn("system", "s"), Turn("user", "<image>\nq"), Turn("assistant", "a")]
    assert images == ["a.jpg"]
    assert turns_from_llava({"image": ["a", "b"], "conversations": [{"from": "human", "value": "x"}]})[1] == ["a", "b"]
    assert turns_from_llava({"conversations": [{"from": "human", "value": "x"}]})[1] == []


@pytest.mark.parametrize("record, kind, message", [
    ([1, 2], "bad_record", "JSON object"),
    ({"id": "x"}, "bad_record", "no 'conversations'"),
    ({"conversations": []}, "empty_conversation", "empty"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "bad_roles", "unknown 'from'"),
    ({"conversations": ["just text"]}, "bad_roles", "'from' and 'value'"),
    ({"image": 3, "conversations": [{"from": "human", "value": "x"}]}, "bad_record", "'image'"),
    ({"image": ["a", ""], "conversations": [{"from": "human", "value": "x"}]}, "bad_record", "'image'"),
])
def test_bad_llava_records(record, kind, message):
    with pytest.raises(BadRecordError, match=message) as info:
        turns_from_llava(record)
    assert info.value.kind == kind


def test_model_without_vision_tower(tok):
    formatter = ChatFormatter(tok, tokens_per_image=0)
    turns = [Turn("user", "What is 3 plus 4?"), Turn("assistant", "7")]
    encoded = formatter.encode(turns, 0)
    assert encoded.tokens.tolist() == ChatFormatter(tok, tokens_per_image=T).encode(turns, 0).tokens.tolist()
    with pytest.raises(BadRecordError, match="no vision tower") as info:
        formatter.encode([Turn("user", "<image>\nq"), Turn("assistant", "a")], 1)
    assert info.value.kind == "image_without_tower"
    with pytest.raises(ValueError, match="negative"):
        ChatFormatter(tok, tokens_per_image=-1)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_load_tokenizer_from_a_remote_directory(tok, tmp_path, monkeypatch):
    """A gs:// directory is read through a local copy of its tokenizer files (a local one stands in here)."""
    remote = tmp_path / "checkpoint"
    tok.save_pretrained(remote)
    (remote / "model.safetensors").write_bytes(b"weights are not copied")
    monkeypatch.setattr(tokenizer_module, "_is_remote", lambda path: True)
    load_local, copied = tokenizer_module._load_local, []

    def spy(local, shown):
        copied.extend(sorted(os.listdir(local)))
        return load_local(local, shown)

    monkeypatch.setattr(tokenizer_module, "_load_local", spy)
    loaded = load_tokenizer(remote)
    assert "tokenizer.json" in copied and "model.safetensors" not in copied  # tokenizer files only
    local = loaded.name_or_path
    assert local != str(remote) and not os.path.exists(local)  # a temporary copy, removed after loading
    text = "<|im_start|>user\nWhat colour is the image?<|im_end|>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds none of tokenizer.json"):
        load_tokenizer(tmp_path / "weights_only")


def test_local_tokenizer_layout(tok):
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([509, 510, 511]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok("héllo wörld\n", add_special_tokens=False)["input_ids"]) == "héllo wörld\n"
