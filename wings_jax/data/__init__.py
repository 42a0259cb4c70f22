"""Data: image preprocessing, ChatML formatting, record sources, sequence assembly, the grain pipeline.

Nothing here imports JAX: grain's worker processes import these modules.
"""
from wings_jax.model.inputs import IMAGE_TOKEN_ID, normalize

from .assemble import Prompt, encode_prompt
from .batch import BATCH_KEYS, BatchSpec
from .constants import DEFAULT_SYSTEM_PROMPT, IGNORE_ID, IMAGE_PLACEHOLDER
from .conversation import ChatFormatter, EncodedConversation, Turn
from .errors import BadImageError, BadRecordError, DataError
from .images import load_image, preprocess_image, to_square_pixels
from .pipeline import DataIterator, default_data_config, make_data_iterator, source_config
from .tokenizer import build_local_qwen_tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS", "BadImageError", "BadRecordError", "BatchSpec", "ChatFormatter", "DEFAULT_SYSTEM_PROMPT", "DataError",
    "DataIterator", "EncodedConversation", "IGNORE_ID", "IMAGE_PLACEHOLDER", "IMAGE_TOKEN_ID", "Prompt", "Turn",
    "build_local_qwen_tokenizer", "default_data_config", "encode_prompt", "load_image", "load_tokenizer",
    "make_data_iterator", "normalize", "preprocess_image", "source_config", "to_square_pixels",
]
