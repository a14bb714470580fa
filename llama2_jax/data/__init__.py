"""Tokenizer, datasets and the grain input pipeline."""

from llama2_jax.data.config import default_data_config
from llama2_jax.data.pipeline import Batches, load_tokenizer, make_batches
from llama2_jax.data.records import RATING_LEVELS, DataError
from llama2_jax.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

__all__ = ["Batches", "DataError", "RATING_LEVELS", "Tokenizer", "TokenizerError", "default_data_config",
           "load_tokenizer", "make_batches", "train_tokenizer"]
