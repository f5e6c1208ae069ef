"""vlmstream: stream image-text training data for vision-language models from WebDataset shards."""

from .format import Conversation, FormatError, ShardInfo, conversation_from_sample

__all__ = ["Conversation", "FormatError", "ShardInfo", "conversation_from_sample"]
__version__ = "0.1.0"
