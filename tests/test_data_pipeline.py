"""The grain pipeline: truncation, padding, packing, determinism, sharding, resume, bad records, sources."""
import dataclasses
import io
import json
import os
import pickle
import re
import struct

import numpy as np
import pytest
from PIL import Image

from wings_jax.data import (
    BATCH_KEYS,
    IGNORE_ID,
    BadImageError,
    IMAGE_TOKEN_ID,
    BadRecordError,
    ChatFormatter,
    DataError,
    build_local_qwen_tokenizer,
    default_data_config,
    make_data_iterator,
    source_config,
)
from wings_jax.data.assemble import truncation_point
from wings_jax.data.batch import FIELDS, BatchSpec, pad_rows
from wings_jax.data.record import RecordToExample
from wings_jax.data.prepare import main as prepare_main
from wings_jax.data.sources import (
    ArrayRecordSource, JsonlSource, RawRecord, open_source, pack_record, parse_record, unpack_record)

S = 8  # image size
T = 4  # slots per image


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_local_qwen_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=512)


def _colour(i):
    return ((i * 37) % 256, (i * 91) % 256, (i * 13 + 50) % 256)


def _write_image(path, i, size=(10, 6)):
    Image.fromarray(np.full((size[1], size[0], 3), _colour(i), np.uint8)).save(path)


def _record(i, num_images=1):
    """Record i: its number is in the question and the answer, so it can be recognised in a batch."""
    if num_images == 0:
        return {"id": f"r{i}", "conversations": [
            {"from": "human", "value": f"Record {i}: say hi"}, {"from": "gpt", "value": f"hi {i}"}]}
    images = [f"img{i}_{k}.png" for k in range(num_images)]
    question = "".join("<image>" for _ in images) + f"\nRecord {i}: what colour?"
    return {"id": f"r{i}", "image": images if num_images > 1 else images[0], "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": f"colour {i}"}]}


def _write_dataset(tmp_path, n, *, name="data.jsonl", images_of=lambda i: i % 2, extra_lines=()):
    """n records (alternately with and without an image) and their PNG files; extra raw lines inserted."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        record = _record(i, images_of(i))
        for k in range(images_of(i)):
            _write_image(root / f"img{i}_{k}.png", i + 100 * k)
        lines.append(json.dumps(record).encode())
    for position, raw in extra_lines:
        lines.insert(position, raw)
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), str(root)


def _config(path, root, **overrides):
    cfg = default_data_config()
    cfg.sources = [source_config("llava_json", path, image_root=root)]
    cfg.max_len, cfg.max_images, cfg.shuffle, cfg.num_epochs = 96, 2, False, 1
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _iterator(cfg, tok, batch=2, **kw):
    return make_data_iterator(cfg, tokenizer=tok, image_size=S, tokens_per_image=T, global_batch_size=batch, **kw)


def _take(it, k=None):
    out = []
    try:
        while k is None or len(out) < k:
            out.append(next(it))
    except StopIteration:
        pass
    finally:
        if k is None:
            it.close()
    return out


def _segments(batch):
    """(row, segment id, slice) of every conversation in a batch."""
    for r in range(len(batch["tokens"])):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all(), "a segment must be contiguous"
            yield r, int(s), slice(idx[0], idx[-1] + 1)


def _record_number(tok, tokens):
    text = tok.decode([t for t in tokens.tolist() if t != IMAGE_TOKEN_ID])
    return int(re.search(r"Record (\d+)", text).group(1))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------------------------------------ truncation


@pytest.mark.parametrize("length, starts, max_len, max_images, expected", [
    (30, [5], 40, 1, (30, 1)),  # fits
    (30, [5], 20, 1, (20, 1)),  # cut after the image
    (30, [5], 8, 1, (5, 0)),  # the image does not fit: cut before it, drop it
    (30, [5], 9, 1, (9, 1)),  # exactly fits
    (30, [5, 12], 14, 2, (12, 1)),  # the second image would be split: cut before it
    (30, [5, 9], 40, 1, (9, 1)),  # more images than max_images: cut before the first extra one
    (30, [5, 9], 40, 0, (5, 0)),
    (10, [], 4, 3, (4, 0)),
])
def test_truncation_point(length, starts, max_len, max_images, expected):
    assert truncation_point(length, starts, T, max_len, max_images) == expected


def test_truncation_in_the_pipeline(tmp_path, tok):
    """Truncation cuts before an image that does not fit (by length or by max_images) and drops the rest;
    the exchange before it still trains."""
    (tmp_path / "images").mkdir()
    for k in range(2):
        _write_image(tmp_path / "images" / f"img0_{k}.png", k)
    turns = [{"from": "human", "value": "<image>\nRecord 0: what colour?"}, {"from": "gpt", "value": "colour 0"},
             {"from": "human", "value": "<image>\nand this one?"}, {"from": "gpt", "value": "colour 100"}]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "r0", "image": ["img0_0.png", "img0_1.png"], "conversations": turns}) + "\n")
    path, root = str(path), str(tmp_path / "images")
    encoded = ChatFormatter(tok, tokens_per_image=T).encode(
        [{"role": "user", "content": "<image>\nRecord 0: what colour?"}, {"role": "assistant", "content": "colour 0"},
         {"role": "user", "content": "<image>\nand this one?"}, {"role": "assistant", "content": "colour 100"}], 2)
    first, second = encoded.image_starts
    # max_len ends inside the second image: cut before it, keep only the first image.
    batch = _take(_iterator(_config(path, root, max_len=second + T - 1), tok, batch=1))[0]
    assert batch["segment_ids"][0].sum() == second
    np.testing.assert_array_equal(batch["tokens"][0, :second], encoded.tokens[:second])
    assert (batch["tokens"][0] == IMAGE_TOKEN_ID).sum() == T
    assert batch["image_mask"][0].tolist() == [True, False]
    assert (batch["images"][0, 1] == 0).all()
    np.testing.assert_array_equal(batch["labels"][0, :second], encoded.labels[:second])  # the first answer trains
    # max_images=1 drops the second image and the text after it, even with room to spare.
    batch = _take(_iterator(_config(path, root, max_len=160, max_images=1), tok, batch=1))[0]
    assert batch["segment_ids"][0].sum() == second and batch["image_mask"][0].tolist() == [True]


@pytest.mark.parametrize("overrides, kind, message", [
    ({"max_images": 1}, "too_many_images", "the record has 2 images, data.max_images=1"),
    ({"max_len": 64}, "answer_truncated", "cut to data.max_len=64 before its first answer"),
])
def test_records_left_with_nothing_to_train_are_bad_records(tmp_path, tok, overrides, kind, message):
    """Two images before the answer with max_images=1, or an answer beyond max_len: the row would have no
    labelled token. Refused (policy 'error') or skipped and counted by reason (policy 'skip')."""
    path, root = _write_dataset(tmp_path, 3, images_of=lambda i: 2 if i == 1 else 0)
    if kind == "answer_truncated":  # record 1: a question longer than max_len
        lines = open(path).read().splitlines()
        lines[1] = json.dumps({"id": "r1", "conversations": [
            {"from": "human", "value": "Record 1: " + "tell me more " * 40}, {"from": "gpt", "value": "no"}]})
        open(path, "w").write("\n".join(lines) + "\n")
    cfg = _config(path, root, **overrides)
    with pytest.raises(BadRecordError, match=re.escape(f"{path} line 2")) as info:
        _take(_iterator(cfg, tok, batch=1))
    assert info.value.kind == kind and message in str(info.value)
    cfg.bad_record_policy, cfg.max_bad_fraction = "skip", 0.5
    it = _iterator(cfg, tok, batch=1)
    rows = [_record_number(tok, b["tokens"][0]) for b in _take(it)]
    assert rows == [0, 2] and dict(it.stats.skipped) == {kind: 1}
    assert it.stats.summary() == f"3 records read, 1 skipped ({kind}: 1)"


def test_row_layout(tmp_path, tok):
    path, root = _write_dataset(tmp_path, 4)
    batches = _take(_iterator(_config(path, root), tok))
    assert len(batches) == 2
    encoder = RecordToExample(ChatFormatter(tok, tokens_per_image=T), image_size=S, image_aspect="pad",
                              max_len=96, max_images=2)
    source = JsonlSource(path, root)
    for b, batch in enumerate(batches):
        assert set(batch) == set(BATCH_KEYS)
        for r in range(2):
            example = encoder(source[2 * b + r])
            n = len(example["tokens"])
            np.testing.assert_array_equal(batch["tokens"][r, :n], example["tokens"])
            np.testing.assert_array_equal(batch["labels"][r, :n], example["labels"])
            np.testing.assert_array_equal(batch["text_mask"][r, :n], example["text_mask"])
            assert batch["positions"][r].tolist() == list(range(n)) + [0] * (96 - n)
            assert batch["segment_ids"][r].tolist() == [1] * n + [0] * (96 - n)
            assert (batch["labels"][r, n:] == IGNORE_ID).all() and not batch["text_mask"][r, n:].any()
            k = len(example["images"])
            assert batch["image_mask"][r].tolist() == [True] * k + [False] * (2 - k)
            np.testing.assert_array_equal(batch["images"][r, :k], example["images"])
            assert (batch["images"][r, k:] == 0).all()


@pytest.mark.parametrize("packing,max_images", [(False, 2), (True, 2), (False, 0)])
def test_batches_have_the_spec_layout(tmp_path, tok, packing, max_images):
    """Padded and packed batches, with and without image slots, have exactly BatchSpec's shapes and dtypes."""
    path, root = _write_dataset(tmp_path, 4, images_of=lambda i: min(i % 2, max_images))
    image_size = S if max_images else 0
    it = make_data_iterator(_config(path, root, max_images=max_images, packing=packing), tokenizer=tok,
                            image_size=image_size, tokens_per_image=T if max_images else 0, global_batch_size=2)
    expected = BatchSpec(2, 96, max_images, image_size).shapes()
    for batch in _take(it):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(t)) for k, (s, t) in
                                                                     expected.items()}


def test_prompt_batches_share_the_padding():
    """Generation prompts are padded by the same routine: FIELDS' dtypes and padding values; pixels float32."""
    with_image = {"tokens": np.array([5, 6, 7], np.int32), "text_mask": np.array([0, 1, 1], bool),
                  "images": np.ones((1, S, S, 3), np.float32)}
    text_only = {"tokens": np.array([9], np.int32), "positions": np.array([4], np.int32),
                 "text_mask": np.array([1], bool), "images": np.zeros((0, 1, 1, 3), np.float32)}
    batch = pad_rows([text_only, with_image], 5, 2, image_dtype=np.float32)
    assert set(batch) == set(BATCH_KEYS) - {"labels"}
    for key, array in batch.items():
        assert array.dtype == (np.float32 if key == "images" else FIELDS[key].dtype)
    assert batch["positions"].tolist() == [[4, 0, 0, 0, 0], [0, 1, 2, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["image_mask"].tolist() == [[False, False], [True, False]]
    assert batch["images"].shape == (2, 2, S, S, 3) and batch["images"].sum() == S * S * 3
    with pytest.raises(ValueError, match="does not fit a row of 2 tokens"):
        pad_rows([with_image], 2, 2)


# --------------------------------------------------------------------------------------------------- packing


def test_packing(tmp_path, tok):
    n = 24
    path, root = _write_dataset(tmp_path, n, images_of=lambda i: i % 3)
    max_len, max_images = 160, 3
    cfg = _config(path, root, max_len=max_len, max_images=max_images, packing=True)
    batches = _take(_iterator(cfg, tok, batch=1))
    encoder = RecordToExample(ChatFormatter(tok, tokens_per_image=T), image_size=S, image_aspect="pad",
                              max_len=max_len, max_images=max_images)
    source = JsonlSource(path, root)
    seen, segments_per_row = [], []
    for batch in batches:
        row_images = batch["images"][0][batch["image_mask"][0]]
        next_image, segs = 0, list(_segments(batch))
        segments_per_row.append(len(segs))
        assert [s for _, s, _ in segs] == list(range(1, len(segs) + 1))
        for _, _, sl in segs:
            i = _record_number(tok, batch["tokens"][0, sl])
            example = encoder(source[i])
            np.testing.assert_array_equal(batch["tokens"][0, sl], example["tokens"])
            np.testing.assert_array_equal(batch["labels"][0, sl], example["labels"])
            np.testing.assert_array_equal(batch["text_mask"][0, sl], example["text_mask"])
            assert batch["positions"][0, sl].tolist() == list(range(sl.stop - sl.start))
            # The k-th valid image of the row belongs to the k-th image run of the row.
            k = len(example["images"])
            np.testing.assert_array_equal(row_images[next_image:next_image + k], example["images"])
            next_image += k
            seen.append(i)
        assert next_image == len(row_images)
        pad = batch["segment_ids"][0] == 0
        assert (batch["labels"][0][pad] == IGNORE_ID).all() and (batch["positions"][0][pad] == 0).all()
        assert (batch["images"][0][~batch["image_mask"][0]] == 0).all()
    assert sorted(seen) == list(range(n))  # every conversation exactly once
    assert max(segments_per_row) >= 3  # rows really hold several conversations


# ------------------------------------------------------------------------------ determinism, shards, mixing


def test_same_seed_same_batches(tmp_path, tok):
    path, root = _write_dataset(tmp_path, 20)
    cfg = _config(path, root, shuffle=True, num_epochs=None, seed=3)
    a, b = _take(_iterator(cfg, tok), 6), _take(_iterator(cfg, tok), 6)
    _assert_batches_equal(a, b)
    cfg.seed = 4
    c = _take(_iterator(cfg, tok), 6)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_epochs_reshuffle_and_cover(tmp_path, tok):
    n = 8
    path, root = _write_dataset(tmp_path, n)
    cfg = _config(path, root, shuffle=True, num_epochs=2, seed=0)
    rows = [_record_number(tok, b["tokens"][r]) for b in _take(_iterator(cfg, tok)) for r in range(2)]
    assert len(rows) == 2 * n
    assert sorted(rows[:n]) == list(range(n)) and sorted(rows[n:]) == list(range(n))
    assert rows[:n] != rows[n:] and rows[:n] != list(range(n))


def test_hosts_get_disjoint_shards_covering_the_data(tmp_path, tok):
    n, hosts = 12, 3
    path, root = _write_dataset(tmp_path, n)
    cfg = _config(path, root, shuffle=True, seed=1)
    per_host = []
    for p in range(hosts):
        batches = _take(_iterator(cfg, tok, batch=hosts, process_index=p, process_count=hosts))
        assert all(b["tokens"].shape[0] == 1 for b in batches)  # global batch // hosts rows
        per_host.append({_record_number(tok, b["tokens"][0]) for b in batches})
    assert [len(s) for s in per_host] == [n // hosts] * hosts
    assert set().union(*per_host) == set(range(n))


def test_mixing_weights(tmp_path, tok):
    a_path, root = _write_dataset(tmp_path, 40, name="a.jsonl", images_of=lambda i: 1)
    b_path, _ = _write_dataset(tmp_path, 40, name="b.jsonl", images_of=lambda i: 0)
    cfg = _config(a_path, root, shuffle=True, num_epochs=None)
    cfg.sources = [source_config("llava_json", a_path, image_root=root, weight=3.0),
                   source_config("llava_json", b_path, weight=1.0)]
    batches = _take(_iterator(cfg, tok, batch=4), 10)
    with_image = sum(int(b["image_mask"][r].any()) for b in batches for r in range(4))
    assert with_image == 30  # exactly 3 : 1 over whole mixing periods


# ------------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_next_batch(tmp_path, tok, packing):
    path, root = _write_dataset(tmp_path, 30, images_of=lambda i: i % 3)
    cfg = _config(path, root, shuffle=True, num_epochs=None, packing=packing, max_len=128, max_images=3)
    full = _take(_iterator(cfg, tok, batch=2), 8)
    it = _iterator(cfg, tok, batch=2)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    resumed = _iterator(cfg, tok, batch=2)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), full[5:])


def test_workers_give_the_same_batches_and_resume(tmp_path, tok):
    path, root = _write_dataset(tmp_path, 30, images_of=lambda i: i % 3)
    cfg = _config(path, root, shuffle=True, num_epochs=None, max_images=3)
    reference = _take(_iterator(cfg, tok), 7)
    cfg.worker_count = 2
    it = _iterator(cfg, tok)
    try:
        first = _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    _assert_batches_equal(first, reference[:4])
    resumed = _iterator(cfg, tok)
    try:
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 3), reference[4:])
    finally:
        resumed.close()


def test_state_of_another_pipeline_is_refused(tmp_path, tok):
    path, root = _write_dataset(tmp_path, 6)
    it = _iterator(_config(path, root), tok)
    state = it.get_state()
    with pytest.raises(ValueError, match="different pipeline"):
        _iterator(_config(path, root, max_len=64), tok).set_state(state)


# ------------------------------------------------------------------------------------------------- bad records


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _bad_lines(root):
    """One raw line per kind of bad record (writes the corrupt image it needs under root)."""
    (root / "cut.jpg").write_bytes(_jpeg_bytes()[:400])
    ok = [{"from": "human", "value": "<image>\nRecord 999: what?"}, {"from": "gpt", "value": "x"}]
    return {
        "missing_image": json.dumps({"id": "m", "image": "nowhere.png", "conversations": ok}).encode(),
        "bad_image": json.dumps({"id": "c", "image": "cut.jpg", "conversations": ok}).encode(),
        "placeholder_mismatch": json.dumps({"id": "p", "image": ["img0_0.png", "img0_0.png"],
                                            "conversations": ok}).encode(),
        "empty_conversation": json.dumps({"id": "e", "conversations": []}).encode(),
        "bad_encoding": b'{"id": "\xff\xfe", "conversations": []}',
    }


@pytest.mark.parametrize("kind", ["missing_image", "bad_image", "placeholder_mismatch", "empty_conversation",
                                  "bad_encoding"])
def test_bad_record_policy_error(tmp_path, tok, kind):
    (tmp_path / "images").mkdir()
    line = _bad_lines(tmp_path / "images")[kind]
    path, root = _write_dataset(tmp_path, 6, images_of=lambda i: 1, extra_lines=[(3, line)])
    it = _iterator(_config(path, root, bad_record_policy="error"), tok)
    with pytest.raises(BadRecordError, match=re.escape(f"{path} line 4")) as info:
        _take(it)
    assert info.value.kind == kind
    assert "bad_record_policy" in str(info.value)  # says what to do


def test_bad_record_policy_skip(tmp_path, tok):
    (tmp_path / "images").mkdir()
    bad = _bad_lines(tmp_path / "images")
    n = 40
    extra = [(5 * (k + 1), line) for k, line in enumerate(bad.values())]
    path, root = _write_dataset(tmp_path, n, images_of=lambda i: 1, extra_lines=extra)
    cfg = _config(path, root, bad_record_policy="skip", max_bad_fraction=0.2, bad_fraction_min_seen=10)
    it = _iterator(cfg, tok, batch=1)
    rows = [_record_number(tok, b["tokens"][0]) for b in _take(it)]
    assert rows == list(range(n))  # every good record, in order, none of the bad ones
    assert dict(it.stats.skipped) == {k: 1 for k in bad}
    assert it.stats.seen == n + len(bad)
    # Too many bad records: a clear error with the counts by reason.
    cfg.max_bad_fraction = 0.05
    with pytest.raises(DataError, match=r"skipped \(.*missing_image: 1.*\): more bad records than data.max_bad_fraction"):
        _take(_iterator(cfg, tok, batch=1))


# ------------------------------------------------------------------------------------------- other sources


def test_array_record_prepare_and_read_equal_jsonl(tmp_path, tok, capsys):
    (tmp_path / "images").mkdir()
    missing = _bad_lines(tmp_path / "images")["missing_image"]
    path, root = _write_dataset(tmp_path, 11, images_of=lambda i: i % 3, extra_lines=[(4, missing)])
    out = tmp_path / "out" / "data.array_record"
    prepare_main(["--input", path, "--image-root", root, "--output", str(out), "--num-shards", "2"])
    assert "1 image(s) were missing" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "data.array_record-00000-of-00002", "data.array_record-00001-of-00002"]
    jsonl, packed = JsonlSource(path, root), ArrayRecordSource(str(out))
    assert len(jsonl) == len(packed) == 12
    for i in range(len(jsonl)):
        a, b = jsonl[i], packed[i]
        assert b.origin == f"{out}-{i // 6:05d}-of-00002 record {i % 6}"  # the shard file and the record in it
        assert b.unpacked().origin == f"{b.origin} (prepared from {a.origin})"
        turns_a, images_a = parse_record(a)
        try:
            turns_b, images_b = parse_record(b)
        except BadImageError as e:  # the JSONL record's image file does not exist either
            assert e.kind == "missing_image" and not os.path.exists(images_a[0][1])
            continue
        assert turns_a == turns_b
        assert [name for name, _ in images_a] == [name for name, _ in images_b]
        assert [open(p, "rb").read() for _, p in images_a] == [data for _, data in images_b]
    # And the pipeline gives the same batches from either.
    cfg = _config(path, root, shuffle=True, bad_record_policy="skip", max_bad_fraction=0.5, max_images=3)
    from_jsonl = _take(_iterator(cfg, tok))
    cfg.sources = [source_config("array_record", str(out))]
    _assert_batches_equal(_take(_iterator(cfg, tok)), from_jsonl)


def _write_array_record(path, blobs):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for blob in blobs:
        writer.write(blob)
    writer.close()


def _packed(i):
    return pack_record(f"data.jsonl line {i + 1}", json.dumps(_record(i, 0)).encode(), [])


def _with_header(header):
    return b"WJR1" + struct.pack("<I", len(header)) + header


_GOOD = pack_record("data.jsonl line 1", json.dumps(_record(0, 1)).encode(), [("img0_0.png", b"PNG DATA")])


@pytest.mark.parametrize("blob", [
    b"",  # empty
    b"WJR1\x01",  # too short for the header length
    b"XXXX" + _GOOD[4:],  # not our mark
    _GOOD[:20],  # cut inside the header: the header is not JSON
    _GOOD[:-1],  # cut inside the image
    _GOOD + b"?",  # trailing bytes
    _with_header(b"[1]"),  # a header that is not an object
    _with_header(b'{"origin": "x"}'),  # no sizes
    _with_header(b'{"origin": "x", "record": -1, "images": []}'),  # no record
])
def test_damaged_array_record_blobs_are_bad_records(blob):
    assert unpack_record(_GOOD).images == {"img0_0.png": b"PNG DATA"}
    with pytest.raises(BadRecordError, match="not a readable wings_jax record") as info:
        parse_record(RawRecord("x.array_record record 0", blob, unpack=unpack_record))
    assert info.value.kind == "corrupt_record"


def test_origin_of_a_prepared_record_names_its_source_line(tok):
    raw = RawRecord("x.array_record record 0", pack_record("data.jsonl line 7", b'{"conversations": [', []),
                    unpack=unpack_record)
    assert raw.unpacked().origin == "x.array_record record 0 (prepared from data.jsonl line 7)"
    with pytest.raises(BadRecordError, match="not valid JSON") as info:
        parse_record(raw)
    assert info.value.kind == "bad_json"
    encoder = RecordToExample(ChatFormatter(tok, tokens_per_image=T), image_size=S, image_aspect="pad",
                              max_len=96, max_images=2)
    assert encoder(raw).origin == "x.array_record record 0 (prepared from data.jsonl line 7)"
    # Also for what goes wrong after decoding.
    no_answer = json.dumps({"conversations": [{"from": "human", "value": "q"}]}).encode()
    raw = dataclasses.replace(raw, data=pack_record("data.jsonl line 8", no_answer, []))
    bad = encoder(raw)
    assert bad.kind == "bad_roles" and bad.origin == "x.array_record record 0 (prepared from data.jsonl line 8)"


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_damaged_array_record_blob_follows_the_policy(tmp_path, tok, policy):
    path = tmp_path / "data.array_record"
    blobs = [_packed(i) for i in range(8)]
    blobs[3] = blobs[3][:20]  # cut inside the header
    _write_array_record(path, blobs)
    cfg = _config("", "", bad_record_policy=policy, max_bad_fraction=0.5)
    cfg.sources = [source_config("array_record", str(path))]
    it = _iterator(cfg, tok, batch=1)
    if policy == "error":
        message = re.escape(f"{path} record 3: not a readable wings_jax record")
        with pytest.raises(BadRecordError, match=message) as info:
            _take(it)
        assert info.value.kind == "corrupt_record"
        return
    rows = [_record_number(tok, b["tokens"][0]) for b in _take(it)]
    assert rows == [0, 1, 2, 4, 5, 6, 7]
    assert dict(it.stats.skipped) == {"corrupt_record": 1} and it.stats.seen == 8


def test_prepare_refuses_a_remote_output(tmp_path, monkeypatch):
    path, root = _write_dataset(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="write to a local directory, then copy the shards with gsutil"):
        prepare_main(["--input", path, "--image-root", root, "--output", "gs://bucket/data.array_record"])
    assert not (tmp_path / "gs:").exists()


def test_tfds_source(tmp_path, tok):
    tfds = pytest.importorskip("tensorflow_datasets")
    records = {i: _record(i, i % 3) for i in range(7)}

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(np.full((6, 10, 3), _colour(i), np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    # Not registered by name: the source finds the prepared files in data_dir, as for a data set built elsewhere.
    with tfds.core.registered.skip_registration():
        class TinyConversations(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "conversations": tfds.features.Text(),
                    "image": tfds.features.Sequence(tfds.features.Image(encoding_format="png")),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, record in records.items():
                    yield i, {"conversations": json.dumps(record["conversations"]),
                              "image": [png(i + 100 * k) for k in range(i % 3)]}

    data_dir = tmp_path / "tfds"
    TinyConversations(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    src_cfg = source_config("tfds", "tiny_conversations", data_dir=str(data_dir), split="train")
    source = open_source(src_cfg)
    assert len(source) == len(records)
    formatter = ChatFormatter(tok, tokens_per_image=T)
    for index in range(len(source)):
        turns, images = parse_record(source[index])
        i = _record_number(tok, formatter.encode(turns, len(images)).tokens)
        assert turns[-1].text == records[i]["conversations"][-1]["value"] and len(images) == i % 3
        for k, (_, pixels) in enumerate(images):
            assert tuple(pixels[0, 0]) == _colour(i + 100 * k)
    # Through the pipeline: every record once, its images where its image runs are.
    cfg = _config("", "", max_images=2)
    cfg.sources = [src_cfg]
    rows = [(b, r) for b in _take(_iterator(cfg, tok, batch=1)) for r in range(1)]
    assert sorted(_record_number(tok, b["tokens"][r]) for b, r in rows) == list(range(len(records)))
    for b, r in rows:
        i = _record_number(tok, b["tokens"][r])
        assert b["image_mask"][r].sum() == i % 3
        for k in range(i % 3):
            np.testing.assert_array_equal(b["images"][r, k, S // 2, S // 2], _colour(i + 100 * k))
    # A feature that is not there: a bad record under the policy, named by its example.
    cfg.sources = [source_config("tfds", "tiny_conversations", data_dir=str(data_dir), conversations_key="chat")]
    message = r"tfds tiny_conversations split train example \d+: feature 'chat'"
    with pytest.raises(BadRecordError, match=message) as info:
        _take(_iterator(cfg, tok, batch=1))
    assert info.value.kind == "bad_example"


def test_json_list_source_equals_jsonl(tmp_path, tok):
    path, root = _write_dataset(tmp_path, 9)
    records = [json.loads(line) for line in open(path)]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records))
    cfg = _config(path, root, shuffle=True)
    from_jsonl = _take(_iterator(cfg, tok))
    cfg.sources = [source_config("llava_json", str(json_path), image_root=root)]
    _assert_batches_equal(_take(_iterator(cfg, tok)), from_jsonl)


def test_jsonl_source_lines_and_close(tmp_path):
    record = json.dumps(_record(0, 0)).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n" + record + b"\n   \n\t" + record + b"\r\n\n" + record)  # no final newline
    source = JsonlSource(str(path))
    assert len(source) == 3
    assert [source[i].origin for i in range(3)] == [f"{path} line {n}" for n in (2, 4, 6)]
    assert [parse_record(source[i])[0] for i in range(3)] == [parse_record(source[0])[0]] * 3
    source.close()
    assert source[2].data == record  # reading again reopens the file
    assert pickle.loads(pickle.dumps(source))[1].data == b"\t" + record + b"\r"
    source.close()
    path.write_bytes(b"")
    assert len(JsonlSource(str(path))) == 0
    path.write_bytes(b" \n\n")
    assert len(JsonlSource(str(path))) == 0


@pytest.mark.parametrize("packing", [False, True])
def test_model_without_vision_tower(tmp_path, tok, packing):
    path, root = _write_dataset(tmp_path, 8, images_of=lambda i: int(i == 2))
    cfg = _config(path, root, max_images=0, packing=packing, bad_record_policy="skip", max_bad_fraction=0.5)

    def iterator(cfg):
        return make_data_iterator(cfg, tokenizer=tok, image_size=0, tokens_per_image=0, global_batch_size=2)

    it = iterator(cfg)
    batches = _take(it)
    assert batches
    for batch in batches:
        assert batch["images"].shape == (2, 0, 1, 1, 3) and batch["images"].dtype == np.uint8
        assert batch["image_mask"].shape == (2, 0) and batch["image_mask"].dtype == bool
        assert not (batch["tokens"] == IMAGE_TOKEN_ID).any()
    seen = sorted(_record_number(tok, b["tokens"][r, sl]) for b in batches for r, _, sl in _segments(b))
    assert 2 not in seen and len(seen) == len(set(seen))
    assert dict(it.stats.skipped) == {"image_without_tower": 1}
    cfg.bad_record_policy = "error"
    with pytest.raises(BadRecordError, match=re.escape(f"{path} line 3: the conversation has 1 image(s), but the "
                                                       "model has no vision tower")):
        _take(iterator(cfg))
    cfg.max_images = 1
    with pytest.raises(ValueError, match="no vision tower .* data.max_images must be 0"):
        iterator(cfg)


def test_demo_dataset(tmp_path):
    from wings_jax.data import load_tokenizer
    from wings_jax.data.demo import COLOURS, make_demo_dataset

    demo = make_demo_dataset(tmp_path / "demo", num_records=40, seed=0)
    tokenizer = load_tokenizer(demo.tokenizer_dir)
    assert len(tokenizer) == 512
    cfg = default_data_config()
    cfg.sources = demo.source_configs()
    cfg.max_len, cfg.max_images, cfg.num_epochs = 64, 1, 1
    batches = _take(make_data_iterator(cfg, tokenizer=tokenizer, image_size=32, tokens_per_image=T,
                                       global_batch_size=4))
    assert batches
    for batch in batches:
        for r in range(4):
            labelled = batch["labels"][r][batch["labels"][r] != IGNORE_ID]
            answer = tokenizer.decode(labelled.tolist())
            assert answer.endswith("<|im_end|>") and len(labelled) >= 2  # nothing was cut off
            if batch["image_mask"][r, 0]:
                # The answer names a colour of the image, so it is learnable from the pixels.
                colour = re.search(r"It is (\w+)\.", answer).group(1)
                close = np.abs(batch["images"][r, 0].astype(int) - COLOURS[colour]).max(axis=-1) < 13
                assert close.mean() > 0.2


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("key, value, message", [
    ("bad_record_policy", "ignore", "bad_record_policy"),
    ("image_aspect", "crop", "image_aspect"),
    ("max_len", T, "cannot hold one image"),
    ("num_epochs", 0, "num_epochs"),
])
def test_config_errors(tmp_path, tok, key, value, message):
    path, root = _write_dataset(tmp_path, 4)
    cfg = _config(path, root)
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        _iterator(cfg, tok)


def test_config_refuses_unknown_keys(tmp_path, tok):
    path, root = _write_dataset(tmp_path, 4)
    cfg = _config(path, root).to_dict()
    cfg["max_length"] = 10
    with pytest.raises(ValueError, match="max_length"):
        _iterator(cfg, tok)
    with pytest.raises(KeyError, match="imageroot"):
        source_config("llava_json", path, imageroot=root)
