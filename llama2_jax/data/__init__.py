"""Tokenizer, datasets and the grain input pipeline."""

from llama2_jax.data.batch import BatchSpec, Field, packed_spec
from llama2_jax.data.config import default_data_config
from llama2_jax.data.pipeline import Batches, Mixture, load_tokenizer, make_batches, open_split
from llama2_jax.data.records import RATING_LEVELS, DataError
from llama2_jax.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer

__all__ = ["BatchSpec", "Batches", "DataError", "Field", "Mixture", "RATING_LEVELS", "Tokenizer", "TokenizerError",
           "default_data_config", "load_tokenizer", "make_batches", "open_split", "packed_spec",
           "train_tokenizer"]
