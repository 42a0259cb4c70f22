"""Constants shared by the data pipeline and the model."""

# Token id of an image slot. Each image fills `tokens_per_image` consecutive slots of this id;
# the model replaces them with the projected vision features. Same value as the original code.
IMAGE_TOKEN_ID = -200

# Label of a position that is not trained (the usual PyTorch / Hugging Face ignore index).
IGNORE_ID = -100

# The placeholder of an image in a conversation's text (LLaVA format).
IMAGE_PLACEHOLDER = "<image>"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Special tokens of Qwen's ChatML.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
