"""Constants of the data pipeline (the image slot id is the model's: `wings_jax.model.inputs`)."""

# Label of a position that is not trained (the usual PyTorch / Hugging Face ignore index).
IGNORE_ID = -100

# The placeholder of an image in a conversation's text (LLaVA format).
IMAGE_PLACEHOLDER = "<image>"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Special tokens of Qwen's ChatML.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
