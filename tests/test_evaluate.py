"""Multiple-choice evaluation: option scores against an independent computation, exact accuracy figures
from the command line, and bad records named by file and line."""
import json

import numpy as np
import pytest
from PIL import Image

from test_generate import save_vision_checkpoint
from wings_jax.data.assemble import Prompt
from wings_jax.data.constants import DEFAULT_SYSTEM_PROMPT
from wings_jax.data.errors import BadRecordError
from wings_jax.data.conversation import Turn
from wings_jax.inference import Engine, encode_chat, load_for_inference
from wings_jax.evaluate import main as evaluate_main
from wings_jax.multiple_choice import read_questions, score_options

# The image question comes first with four options, so its rows fill the first batch of four exactly:
# one batch shape with images, one without (every row fits the 48-token bucket).
RECORDS = [
    {"question": "What colour is the image?", "options": ["red", "green", "blue", "white"], "image": "pic.png",
     "subject": "vision", "id": "v1"},
    {"question": "What is 3 plus 4?", "options": ["7", "8", "12"], "subject": "math"},
    {"question": "What is 8 minus 5?", "options": {"A": "3", "B": "5"}, "subject": "math"},
    {"question": "What is 6 times 7?", "options": ["42", "36"], "subject": "math"},
    {"question": "Which colour is the sky?", "options": ["blue", "yellow", "black"], "subject": "colours"},
    {"question": "Copy this word: apple.", "options": {"X": "apple", "Y": "river"}, "subject": "colours"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (20, 36, 3), np.uint8)).save(root / "pic.png")
    ckpt = save_vision_checkpoint(str(root))
    model, tokenizer = load_for_inference(ckpt)
    return root, ckpt, model, tokenizer


def _answer_formats(records, answers):
    """The records with these answers, written in every accepted form: key, option text, list index."""
    out = []
    for i, (record, answer) in enumerate(zip(records, answers)):
        options = record["options"]
        keys = list(options) if isinstance(options, dict) else ["A", "B", "C", "D"][:len(options)]
        texts = list(options.values()) if isinstance(options, dict) else options
        form = i % 3
        value = keys[answer] if form == 0 else texts[answer] if form == 1 or isinstance(options, dict) else answer
        out.append({**record, "answer": value})
    return out


def test_scores_and_accuracy(setup, capsys):
    root, ckpt, model, tokenizer = setup
    placeholder = write_jsonl(root / "placeholder.jsonl", [{**r, "answer": 0} if isinstance(r["options"], list)
                                                           else {**r, "answer": next(iter(r["options"]))}
                                                           for r in RECORDS])
    questions = read_questions(placeholder)
    scores = score_options(model, tokenizer, questions, batch_size=4, progress=False)

    # Independent computation for the text questions: Qwen's own chat template, the option's tokens
    # appended, one padded batch of all rows through the plain forward.
    system_len = len(tokenizer(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")["input_ids"])
    rows, spans = [], []
    for q in questions[1:]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q.question}], add_generation_prompt=True,
                                               tokenize=True)["input_ids"]
        for option in q.options:
            ids = np.asarray(prompt + tokenizer(option, add_special_tokens=False)["input_ids"], np.int32)
            text_mask = np.arange(len(ids)) >= system_len
            rows.append(Prompt(ids, np.arange(len(ids), dtype=np.int32), text_mask, np.zeros((0, 1, 1, 3)),
                               np.zeros(0, bool)))
            spans.append(range(len(prompt), len(ids)))
    # The image question (its tower outputs are computed once for its four options): the rows with pixels.
    image_prompt = encode_chat(model.cfg, tokenizer, [Turn("user", "<image>\n" + questions[0].question)],
                               [questions[0].image])
    n = len(image_prompt.tokens)
    for option in questions[0].options:
        ids = np.concatenate([image_prompt.tokens, tokenizer(option, add_special_tokens=False)["input_ids"]])
        text_mask = np.concatenate([image_prompt.text_mask, np.ones(len(ids) - n, bool)])
        rows.append(image_prompt._replace(tokens=ids.astype(np.int32), positions=np.arange(len(ids), dtype=np.int32),
                                          text_mask=text_mask))
        spans.append(range(n, len(ids)))
    expected = []
    for logits, span, row in zip(Engine(model).logits(rows), spans, rows):
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        expected.append(sum(logp[t - 1, row.tokens[t]] for t in span))
    np.testing.assert_allclose(np.concatenate(scores[1:] + scores[:1]), expected, rtol=1e-5, atol=1e-4)
    # Per-token scores: the same sums over the options' token counts (which differ: "apple" vs "river" etc.).
    means = score_options(model, tokenizer, questions, batch_size=4, progress=False, score="mean")
    lengths = [len(span) for span in spans]
    assert len(set(lengths)) > 1
    np.testing.assert_allclose(np.concatenate(means[1:] + means[:1]), np.asarray(expected) / lengths,
                               rtol=1e-5, atol=1e-4)
    # Batches that mix image rows with text rows (and padding rows) score the same.
    for size in (3, 16):
        mixed = score_options(model, tokenizer, questions, batch_size=size, progress=False)
        np.testing.assert_allclose(np.concatenate(mixed), np.concatenate(scores), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="score must be one of"):
        score_options(model, tokenizer, questions, score="max")

    preferred = [int(np.argmax(s)) for s in scores]
    data = write_jsonl(root / "right.jsonl", _answer_formats(RECORDS, preferred))
    output = root / "results.json"
    assert evaluate_main(["--ckpt", ckpt, "--data", data, "--batch-size", "4", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert printed == {"accuracy": 1.0, "count": 6, "per_subject": {
        "colours": {"accuracy": 1.0, "count": 2}, "math": {"accuracy": 1.0, "count": 3},
        "vision": {"accuracy": 1.0, "count": 1}}}

    # Two wrong answers: the image question and one math question.
    flipped = list(preferred)
    flipped[0] = (preferred[0] + 1) % 4
    flipped[3] = 1 - preferred[3]
    data = write_jsonl(root / "two_wrong.jsonl", _answer_formats(RECORDS, flipped))
    assert evaluate_main(["--ckpt", ckpt, "--data", data, "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 4 / 6, "count": 6, "per_subject": {
        "colours": {"accuracy": 1.0, "count": 2}, "math": {"accuracy": 2 / 3, "count": 3},
        "vision": {"accuracy": 0.0, "count": 1}}}


def test_scoring_errors_keep_their_kind(setup, tmp_path):
    """An image that exists but cannot be decoded is found when scoring: a record error of kind bad_image."""
    _, _, model, tokenizer = setup
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    path = write_jsonl(tmp_path / "questions.jsonl", [{**RECORDS[1], "answer": "A"},
                                                      {**RECORDS[0], "image": "broken.png", "answer": "A"}])
    with pytest.raises(BadRecordError, match=f"{path}:2:.*broken.png") as error:
        score_options(model, tokenizer, read_questions(path), batch_size=4, progress=False)
    assert error.value.kind == "bad_image"


GOOD = {"question": "What is 3 plus 4?", "options": ["7", "8"], "answer": "A"}
BAD = [
    ({**GOOD, "answer": "C"}, "is not among the options"),
    ({**GOOD, "answer": "9"}, "is not among the options"),
    ({**GOOD, "image": "missing.png"}, "does not exist"),
    ({**GOOD, "options": []}, "at least two options"),
    ({**GOOD, "options": ["7", ""]}, "option B must be a non-empty string"),
    ({**GOOD, "options": {"A": "B", "B": "A"}, "answer": "A"}, "names a key of one option and the text of another"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "'question' must be a non-empty string"),
    ('{"question": "unfinished', "malformed JSON"),
]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_records_name_file_and_line(tmp_path, capsys, record, message):
    path = tmp_path / "questions.jsonl"
    bad_line = record if isinstance(record, str) else json.dumps(record)
    path.write_text(json.dumps(GOOD) + "\n\n" + bad_line + "\n")  # line 2 is blank: line 3 is at fault
    with pytest.raises(BadRecordError, match=message) as error:
        read_questions(str(path))
    assert f"{path}:3:" in str(error.value)
    # The command line checks the data before it loads a model (there is none here) and exits non-zero.
    assert evaluate_main(["--ckpt", str(tmp_path / "no_ckpt"), "--data", str(path)]) != 0
    assert f"{path}:3:" in capsys.readouterr().err
