"""Text corpus -> sentencepiece tokenizer -> packed blocks -> a resumable sample order.

Imports torch and sentencepiece only; `datasets` and `transformers` load inside the functions
that need them (packing, save_hf), with the hub switched off.
"""
from .corpus import DataError, Document, load_documents
from .masking import mlm_mask
from .packing import build_blocks, split_documents
from .stream import SampleStream, SubsetStream, shard
from .tokenizer import Tokenizer, load_tokenizer, train_or_load_tokenizer

__all__ = ["DataError", "Document", "load_documents", "Tokenizer", "train_or_load_tokenizer", "load_tokenizer",
           "build_blocks", "split_documents", "SampleStream", "SubsetStream", "shard", "mlm_mask"]
