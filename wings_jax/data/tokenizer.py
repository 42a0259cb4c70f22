"""Tokenizers: load a Hugging Face tokenizer directory, or build a tiny local Qwen-style one.

The local tokenizer exists for tests and the demo (nothing may be downloaded): a byte-level BPE with
Qwen2's pre-tokenizer pattern, Qwen's special tokens and Qwen's ChatML chat template, trained in a
fraction of a second on a built-in text. Its special tokens come last in the vocabulary, as in Qwen.
"""
from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from .constants import ENDOFTEXT, IM_END, IM_START

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Qwen2's pre-tokenization: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newline runs, other whitespace.
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen1.5 / Qwen2 ChatML template: a default system turn unless the conversation brings its own, every
# turn closed by <|im_end|> and a newline, and an optional assistant header for generation.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text: the words of the demo data set and of ChatML, plus some ordinary English.
_TRAINING_TEXT = """\
system user assistant You are a helpful assistant.
What colour is the image? What color is this picture? Which colour fills the image?
The image is red. The image is green. The image is blue. The image is yellow.
The image is black. The image is white. The image is orange. The image is purple.
The top half is red and the bottom half is blue. The left half is green and the right half is white.
red green blue yellow black white orange purple grey pink brown cyan magenta
Repeat after me: the quick brown fox jumps over the lazy dog.
What is 3 plus 4? 3 plus 4 is 7. What is 12 plus 9? 12 plus 9 is 21.
What is 8 minus 5? 8 minus 5 is 3. What is 6 times 7? 6 times 7 is 42.
Copy this word: apple. apple. Copy this word: river. river. Copy this word: stone. stone.
Say the word backwards: cat. tac. Say the word backwards: dog. god.
Count from one to five: one, two, three, four, five. Count to ten: 1 2 3 4 5 6 7 8 9 10.
Describe the picture in one sentence. A photo of a cat sitting on a wooden table.
Please answer the question briefly. Yes. No. I don't know. It's a picture of a dog.
The model reads the image and the text, then it writes an answer. Thank you! You're welcome.
0123456789 +-*/=()[]{}<>.,;:!?'" \t\n
"""


def build_local_qwen_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Trains a small byte-level BPE tokenizer with Qwen's special tokens and chat template.

    Saves it to ``out_dir`` (loadable with ``transformers.AutoTokenizer.from_pretrained(out_dir)``)
    and returns the loaded tokenizer. ``vocab_size`` counts everything, special tokens included; it
    must leave room for the 256 byte symbols and the 3 special tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT, IM_START, IM_END]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 259 entries")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    # Added after training so they take the last ids, as in Qwen's vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=32768,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)


# The files of a tokenizer directory: what checkpoints carry and remote tokenizers are copied as.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer files present in ``src`` to ``dst`` (local or gs://); returns their names."""
    from etils import epath

    source, target = epath.Path(src), epath.Path(dst)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
            copied.append(name)
    return copied


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Loads a Hugging Face tokenizer directory, local or remote (``gs://...``); nothing is downloaded
    from the Hugging Face Hub.

    transformers reads local files only, so the tokenizer files of a remote directory (not its weights)
    are first copied into a temporary local directory.
    """
    from etils import epath

    path = os.fspath(path)
    if not epath.Path(path).is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path!r} does not exist; point data.tokenizer at a directory with "
            "tokenizer.json / tokenizer_config.json (e.g. one made by build_local_qwen_tokenizer, or the "
            "LLM checkpoint's directory)"
        )
    if not _is_remote(path):
        return _load_local(path, path)
    with tempfile.TemporaryDirectory(prefix="wings_jax_tokenizer_") as local:
        if not copy_tokenizer_files(path, local):
            raise FileNotFoundError(f"tokenizer directory {path!r} holds none of {', '.join(TOKENIZER_FILES)}")
        return _load_local(local, path)


def _is_remote(path: str) -> bool:
    return "://" in path


def _load_local(local: str, shown: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load a tokenizer from {shown!r}: {e}") from e
