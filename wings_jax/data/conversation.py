"""ChatML conversation formatting (Qwen), with image placeholders expanded to image slots.

A conversation is a list of `Turn`s (roles 'system', 'user', 'assistant'). `ChatFormatter.render` writes

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n      (the three lines joined, no line breaks between them)

exactly like Qwen's chat template (`tokenizer.apply_chat_template`); `ChatFormatter.tokenize` tokenizes it
and replaces the k-th `<image>` placeholder by `tokens_per_image` slots of IMAGE_TOKEN_ID for the k-th image.
`ChatFormatter.encode` does both.

Labels are the token ids of every assistant answer, its closing `<|im_end|>` and, when another turn
follows, the newline after it; -100 elsewhere (role headers, user and system turns, image slots).
Labelled tokens are found by character offsets in the rendered text, so the token ids are those of
tokenizing the whole text at once (text between two placeholders is tokenized as one piece).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence, Union

import numpy as np

from wings_jax.model.inputs import IMAGE_TOKEN_ID

from .constants import DEFAULT_SYSTEM_PROMPT, IGNORE_ID, IM_END, IM_START, IMAGE_PLACEHOLDER
from .errors import BadRecordError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
# LLaVA's "from" values.
LLAVA_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # 'system' | 'user' | 'assistant'
    text: str


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    """One tokenized conversation (unpadded, images expanded)."""

    tokens: np.ndarray  # int32 (n,)
    labels: np.ndarray  # int32 (n,), IGNORE_ID where not trained
    system_end: int  # index of the first token after the system turn (after its closing newline)
    image_starts: tuple[int, ...]  # start index of each image's run of slots, in image order

    @property
    def text_mask(self) -> np.ndarray:
        """bool (n,): text tokens after the system turn."""
        mask = self.tokens != IMAGE_TOKEN_ID
        mask[: self.system_end] = False
        return mask


TurnLike = Union[Turn, Mapping[str, Any]]


class ChatText(NamedTuple):
    """A conversation rendered as ChatML, before tokenization."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]  # [start, end) characters of each trained answer
    system_end_char: int  # first character after the system turn (after its closing newline)


def as_turns(turns: Sequence[TurnLike]) -> list[Turn]:
    """Accepts `Turn`s or Hugging Face style messages ``{"role": ..., "content": ...}``."""
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, Turn):
            out.append(t)
        elif isinstance(t, Mapping) and "role" in t and "content" in t:
            out.append(Turn(t["role"], t["content"]))
        else:
            raise BadRecordError(f"turn {i} must be a Turn or a {{'role', 'content'}} mapping, got {t!r}",
                                 kind="bad_roles")
    return out


def turns_from_llava(record: Any) -> tuple[list[Turn], list[str]]:
    """Reads a LLaVA-format record: (turns, image references in order).

    ``{"id": ..., "image": "a.jpg" | ["a.jpg", ...] (optional), "conversations": [{"from": "human" |
    "gpt" | "system", "value": str}, ...]}``. Raises `BadRecordError` naming what is wrong.
    """
    if not isinstance(record, Mapping):
        raise BadRecordError(f"a record must be a JSON object, got {type(record).__name__}", kind="bad_record")
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise BadRecordError("the record has no 'conversations' list", kind="bad_record")
    if not conversations:
        raise BadRecordError("the conversation is empty", kind="empty_conversation")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, Mapping) or "from" not in message or "value" not in message:
            raise BadRecordError(f"conversation turn {i} must be an object with 'from' and 'value', got {message!r}",
                                 kind="bad_roles")
        role = LLAVA_ROLES.get(message["from"]) if isinstance(message["from"], str) else None
        if role is None:
            raise BadRecordError(f"conversation turn {i}: unknown 'from' {message['from']!r} "
                                 f"(expected one of {sorted(LLAVA_ROLES)})", kind="bad_roles")
        turns.append(Turn(role, message["value"]))
    images = record.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise BadRecordError(f"'image' must be a path or a list of paths, got {record.get('image')!r}",
                             kind="bad_record")
    return turns, images


class ChatFormatter:
    """Renders and tokenizes ChatML conversations; see the module docstring."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, tokens_per_image: int,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        """``tokens_per_image=0``: a model without a vision tower, which takes no images."""
        if tokens_per_image < 0:
            raise ValueError(f"tokens_per_image must not be negative, got {tokens_per_image}")
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.system_prompt = system_prompt

    def encode(self, turns: Sequence[TurnLike], num_images: int, *,
               add_generation_prompt: bool = False) -> EncodedConversation:
        """Tokenizes a conversation whose ``<image>`` placeholders refer to ``num_images`` images.

        For training (default) the conversation must end with an assistant turn. With
        ``add_generation_prompt`` it must end with a user turn, and the result ends with the assistant
        header so the model writes the answer next.
        """
        return self.tokenize(self.render(turns, num_images, add_generation_prompt=add_generation_prompt))

    def render(self, turns: Sequence[TurnLike], num_images: int, *, add_generation_prompt: bool = False) -> ChatText:
        """The checked conversation as ChatML text (the default system turn first if it has none)."""
        if num_images and not self.tokens_per_image:
            raise BadRecordError(f"the conversation has {num_images} image(s), but the model has no vision tower "
                                 "to read them (tokens_per_image=0)", kind="image_without_tower")
        turns = as_turns(turns)
        _validate(turns, num_images, add_generation_prompt)
        if turns[0].role != "system":
            turns = [Turn("system", self.system_prompt)] + turns

        text, spans, system_end_char = "", [], 0
        for i, turn in enumerate(turns):
            text += f"{IM_START}{turn.role}\n"
            answer_start = len(text)
            text += turn.text + IM_END
            if turn.role == "assistant":
                spans.append((answer_start, len(text) + (1 if i + 1 < len(turns) else 0)))
            text += "\n"
            if i == 0:
                system_end_char = len(text)
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
        return ChatText(text, tuple(spans), system_end_char)

    def encode_next_turn(self, message: str, num_images: int) -> np.ndarray:
        """Token ids (placeholders expanded) of what follows an assistant answer when the user sends ``message``
        (whose placeholders refer to ``num_images`` new images): the answer's closing ``<|im_end|>\\n``, the user
        turn, the assistant header. The text is :meth:`render`'s; tokenized on its own it gives the ids of a
        whole conversation's tokenization, because the special tokens at both ends split the text there too."""
        chat = self.render([Turn("user", ""), Turn("assistant", ""), Turn("user", message)], num_images,
                           add_generation_prompt=True)
        return self._tokenize(chat.text[chat.answer_spans[0][0]:])[0]

    def tokenize(self, chat: ChatText) -> EncodedConversation:
        """Token ids (placeholders expanded to image slots) and labels of rendered ChatML text."""
        tokens, char_starts, image_starts = self._tokenize(chat.text)
        starts = np.asarray([s for s, _ in chat.answer_spans], dtype=np.int64)
        ends = np.asarray([e for _, e in chat.answer_spans], dtype=np.int64)
        # A token is trained iff it starts inside an answer span (the spans are sorted and disjoint).
        k = np.searchsorted(starts, char_starts, side="right") - 1
        inside = ((k >= 0) & (char_starts < ends[np.maximum(k, 0)]) if len(chat.answer_spans)
                  else np.zeros(len(tokens), bool))
        inside &= tokens != IMAGE_TOKEN_ID
        labels = np.where(inside, tokens, IGNORE_ID).astype(np.int32)
        system_end = int(np.searchsorted(char_starts, chat.system_end_char, side="left"))
        return EncodedConversation(tokens, labels, system_end, image_starts)

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """Token ids, the character offset where each token starts, and where each image run starts."""
        chunks = text.split(IMAGE_PLACEHOLDER)
        enc = self.tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True)
        ids, char_starts, image_starts = [], [], []
        chunk_start = 0
        for c, (chunk_ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            ids.extend(chunk_ids)
            char_starts.extend(chunk_start + o[0] for o in offsets)
            chunk_start += len(chunks[c])
            if c + 1 < len(chunks):
                image_starts.append(len(ids))
                ids.extend([IMAGE_TOKEN_ID] * self.tokens_per_image)
                char_starts.extend([chunk_start] * self.tokens_per_image)
                chunk_start += len(IMAGE_PLACEHOLDER)
        return np.asarray(ids, np.int32), np.asarray(char_starts, np.int64), tuple(image_starts)


def _validate(turns: list[Turn], num_images: int, add_generation_prompt: bool) -> None:
    if not turns:
        raise BadRecordError("the conversation is empty", kind="empty_conversation")
    for i, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise BadRecordError(f"turn {i} has role {turn.role!r}; expected one of {ROLES}", kind="bad_roles")
        if not isinstance(turn.text, str):
            raise BadRecordError(f"turn {i} ({turn.role}) has a {type(turn.text).__name__} value; expected a string",
                                 kind="bad_value")
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.text:
            raise BadRecordError(f"turn {i} ({turn.role}) contains {IMAGE_PLACEHOLDER}; images belong in user turns",
                                 kind="placeholder_mismatch")
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise BadRecordError("the conversation has only a system turn", kind="empty_conversation")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            where = i + (len(turns) - len(body))
            raise BadRecordError(
                f"turn {where} is {turn.role!r} where {expected!r} was expected: after an optional first system "
                "turn, user and assistant turns must alternate, starting with user", kind="bad_roles")
    last = body[-1].role
    if add_generation_prompt and last != "user":
        raise BadRecordError("a prompt for generation must end with a user turn", kind="bad_roles")
    if not add_generation_prompt and last != "assistant":
        raise BadRecordError("the conversation ends with a user turn that has no answer", kind="bad_roles")
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != num_images:
        raise BadRecordError(
            f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the record has "
            f"{num_images} image(s); each image needs exactly one placeholder", kind="placeholder_mismatch")
