"""Multiple-choice scoring by option log-likelihood: the question files, the scores, the accuracy report.

Used by ``python -m wings_jax.evaluate`` (the CLI, whose docstring gives the file format), by training's held-out
evaluation and by the forgetting experiment. Each option is scored by the sum (or mean) of the log-probabilities
of its tokens after the generation prompt of the question (ChatML, the question as the user turn, ``<image>``
first if there is an image), exactly as the model would have to write it; the prediction is the best-scoring
option. (question, option) rows run through the teacher-forced forward in batches of fixed size, padded to
bucketed lengths, so few shapes are ever compiled; a question's image goes through the vision tower once for
all its options.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import string
import sys
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from wings_jax.data.assemble import Prompt
from wings_jax.data.checks import check_length
from wings_jax.data.conversation import Turn
from wings_jax.data.errors import BadRecordError, DataError
from wings_jax.inference import Engine, GenerationError, encode_chat, with_continuation, with_image_placeholders
from wings_jax.model.wings import WingsModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class Question:
    where: str  # "FILE:LINE", for messages
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    image: str | None  # resolved path
    subject: str | None


def read_questions(path: str) -> list[Question]:
    """Parses and checks every record of a JSON-lines file; errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise DataError(f"cannot read the evaluation file {path!r}: {e}") from e
    questions = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                questions.append(_question(json.loads(line), where, os.path.dirname(os.path.abspath(path))))
            except json.JSONDecodeError as e:
                raise BadRecordError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not questions:
        raise BadRecordError(f"{path}: holds no records")
    return questions


def _question(record: Any, where: str, root: str) -> Question:
    if not isinstance(record, Mapping):
        raise BadRecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRecordError(f"{where}: 'question' must be a non-empty string")
    keys, options = _options(record.get("options"), where)
    answer = _answer_index(record.get("answer"), keys, options, where)
    image = record.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise BadRecordError(f"{where}: 'image' must be a path, got {image!r}")
        image = os.path.join(root, image)  # an absolute path stays as it is
        if not os.path.isfile(image):
            raise BadRecordError(f"{where}: image file {image!r} does not exist; fix the record's 'image' "
                                 "(relative paths start at the evaluation file's directory)", kind="missing_image")
    subject = record.get("subject")
    return Question(where, question, options, answer, image, None if subject is None else str(subject))


def _options(raw: Any, where: str) -> tuple[list[str], tuple[str, ...]]:
    """(keys, texts): dict keys as given, list options keyed A, B, C, ..."""
    if isinstance(raw, Mapping):
        keys, texts = [str(k) for k in raw], list(raw.values())
    elif isinstance(raw, list):
        if len(raw) > len(string.ascii_uppercase):
            raise BadRecordError(f"{where}: {len(raw)} options; at most 26 (A-Z) are supported")
        keys, texts = list(string.ascii_uppercase[:len(raw)]), raw
    else:
        raise BadRecordError(f"{where}: 'options' must be a list or an object of option texts, got {raw!r}")
    if len(texts) < 2:
        raise BadRecordError(f"{where}: 'options' must hold at least two options, got {len(texts)}")
    for key, text in zip(keys, texts):
        if not isinstance(text, str) or not text.strip():
            raise BadRecordError(f"{where}: option {key} must be a non-empty string, got {text!r}")
    return keys, tuple(texts)


def _answer_index(answer: Any, keys: list[str], options: tuple[str, ...], where: str) -> int:
    """The answer as an option index: a key (or letter), an option's text, or a 0-based index into a list."""
    lettered = keys == list(string.ascii_uppercase[:len(keys)])
    if isinstance(answer, int) and not isinstance(answer, bool) and lettered and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str):
        matches = {i for i, k in enumerate(keys) if k == answer.strip()}
        matches |= {i for i, t in enumerate(options) if t == answer}
        if len(matches) > 1:
            raise BadRecordError(f"{where}: answer {answer!r} names a key of one option and the text of another; "
                                 "give the key", kind="bad_answer")
        if matches:
            return matches.pop()
    raise BadRecordError(f"{where}: answer {answer!r} is not among the options (keys {keys} or their texts)",
                         kind="bad_answer")


# ---------------------------------------------------------------------------------------------
# scoring


def _bad_record(q: Question, e: Exception) -> BadRecordError:
    """``e`` as an error of record ``q``, keeping its kind of problem."""
    return BadRecordError(f"{q.where}: {e}", kind=getattr(e, "kind", BadRecordError.kind))


def _rows(engine: Engine, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question]
          ) -> Iterator[tuple[Prompt, int]]:
    """(prompt + option tokens, number of option tokens) per option, question by question. The prompt's
    ``images`` hold the tower outputs (1, T, D_vision) of the question's image, computed once for its options."""
    for q in questions:
        images = [q.image] if q.image else []
        try:
            prompt = encode_chat(engine.cfg, tokenizer,
                                 [Turn("user", with_image_placeholders(q.question, len(images)))], images)
        except (DataError, GenerationError) as e:
            raise _bad_record(q, e) from None
        prompt = engine.with_image_features(prompt)  # once for all the question's options
        for option in q.options:
            ids = np.asarray(tokenizer(option, add_special_tokens=False)["input_ids"], np.int32)
            n = len(prompt.tokens) + len(ids)
            try:
                check_length(engine.cfg, n, "the question with this option", "shorten the record", GenerationError)
            except GenerationError as e:
                raise _bad_record(q, e) from None
            yield with_continuation(prompt, ids), len(ids)


SCORES = ("sum", "mean")


def score_options(model: WingsModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question],
                  batch_size: int = 8, progress: bool = True, score: str = "sum") -> list[np.ndarray]:
    """Log-likelihood of every option of every question (one array per question): the sum over the option's
    tokens (``score='sum'``), or their mean (``'mean'``, which does not favour options of fewer tokens)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    with_image = next((q for q in questions if q.image), None)
    if with_image is not None and model.cfg.vision is None:
        raise BadRecordError(f"{with_image.where}: the record has an image, but the model has no vision tower")
    engine = Engine(model)
    scores: list[float] = []
    with tqdm(total=sum(len(q.options) for q in questions), desc="options", unit="opt", disable=not progress,
              file=sys.stderr) as bar:
        for chunk in _chunks(_rows(engine, tokenizer, questions), batch_size):
            sums, _ = engine.continuation_scores(chunk, batch_size)
            scores.extend((sums / [k for _, k in chunk] if score == "mean" else sums).tolist())
            bar.update(len(chunk))
    bounds = np.cumsum([0] + [len(q.options) for q in questions])
    return [np.asarray(scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def accuracy_report(questions: Sequence[Question], scores: Sequence[np.ndarray]) -> dict:
    """{"accuracy", "count", "per_subject": {subject: {"accuracy", "count"}}} (questions without subject
    count only in the total)."""
    correct = [int(np.argmax(s)) == q.answer for q, s in zip(questions, scores)]
    by_subject: dict[str, list[bool]] = collections.defaultdict(list)
    for q, ok in zip(questions, correct):
        if q.subject is not None:
            by_subject[q.subject].append(ok)

    def summary(values: list[bool]) -> dict:
        return {"accuracy": sum(values) / len(values), "count": len(values)}

    return {**summary(correct), "per_subject": {s: summary(v) for s, v in sorted(by_subject.items())}}


def evaluate(model: WingsModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question],
             batch_size: int = 8, progress: bool = True, score: str = "sum") -> dict:
    return accuracy_report(questions, score_options(model, tokenizer, questions, batch_size, progress, score))
