"""One stored record to one training example, as a straight line of named steps (big_vision style):

    parse -> format (ChatML) -> tokenise -> truncate -> load images -> assemble the example

Each step is one call into the module that owns its concept (sources, conversation, assemble, images).
Images are loaded after truncation so that dropped ones are never decoded. Runs in grain's worker
processes and never raises for bad data: a bad record becomes a `BadRecord` in the stream, which the
pipeline's bad-record policy then reports or skips.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from . import assemble
from .constants import IGNORE_ID
from .conversation import ChatFormatter, ChatText, EncodedConversation, Turn
from .errors import BadRecordError, DataError
from .images import ImageSource, load_image, to_square_pixels
from .sources import RawRecord, parse_record


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """Stands in the stream for a record that could not be used."""

    kind: str
    origin: str
    message: str


class RecordToExample:
    """RawRecord -> example dict (see assemble), or BadRecord."""

    def __init__(self, formatter: ChatFormatter, *, image_size: int, image_aspect: str, max_len: int,
                 max_images: int):
        self.formatter, self.image_size, self.image_aspect = formatter, image_size, image_aspect
        self.max_len, self.max_images = max_len, max_images

    def __call__(self, raw: RawRecord) -> dict[str, np.ndarray] | BadRecord:
        try:
            raw = raw.unpacked()  # a damaged stored record fails here; after it, the origin is the full one
            turns, images = self.parse(raw)
            chat = self.format(turns, len(images))
            encoded = self.tokenise(chat)
            cut, kept = self.truncate(encoded, len(images))
            pixels = self.load_images(images[:kept])
            return self.assemble(encoded, pixels, cut)
        except DataError as e:
            return BadRecord(e.kind, raw.origin, str(e))

    def parse(self, raw: RawRecord) -> tuple[list[Turn], list[tuple[str, ImageSource]]]:
        return parse_record(raw)

    def format(self, turns: list[Turn], num_images: int) -> ChatText:
        return self.formatter.render(turns, num_images)

    def tokenise(self, chat: ChatText) -> EncodedConversation:
        return self.formatter.tokenize(chat)

    def truncate(self, encoded: EncodedConversation, num_images: int) -> tuple[int, int]:
        """(tokens kept, images kept) under data.max_len and data.max_images; a record left with no answer
        token to train on is bad."""
        cut, kept = assemble.truncation_point(len(encoded.tokens), encoded.image_starts,
                                              self.formatter.tokens_per_image, self.max_len, self.max_images)
        if (encoded.labels[:cut] != IGNORE_ID).any():
            return cut, kept
        if kept < num_images and kept == self.max_images:
            raise BadRecordError(
                f"no answer token is left to train on: the record has {num_images} images, data.max_images="
                f"{self.max_images}, and the row is cut before image {kept + 1}, which comes before the answer; "
                "raise data.max_images or drop the record", kind="too_many_images")
        raise BadRecordError(
            f"no answer token is left to train on: the record's {len(encoded.tokens)} tokens are cut to "
            f"data.max_len={self.max_len} before its first answer; raise data.max_len or shorten the record",
            kind="answer_truncated")

    def load_images(self, images: Sequence[tuple[str, ImageSource]]) -> list[np.ndarray]:
        return [to_square_pixels(load_image(source, name=name), self.image_size, self.image_aspect)
                for name, source in images]

    def assemble(self, encoded: EncodedConversation, pixels: list[np.ndarray], cut: int) -> dict[str, np.ndarray]:
        return assemble.make_example(encoded, pixels, cut, self.image_size)
