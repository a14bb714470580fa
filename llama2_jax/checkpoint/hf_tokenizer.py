"""What transformers reads beside a Hugging Face checkpoint's weights to tokenize, chat and
generate as this project does.

An hf checkpoint written with a tokenizer holds, besides `config.json` and the safetensors:

- `tokenizer.model`: the SentencePiece model itself, copied.
- `tokenizer_config.json`: how to use it. `add_bos_token` true and `add_eos_token` false, as
  `Tokenizer.encode` frames a prompt; `legacy` true, so a text after a special token gets
  SentencePiece's dummy-prefix space like any other text (each turn of a dialog is encoded on its
  own, after its BOS); `model_max_length`, the model's context; the Llama 2 chat format as the
  `chat_template`; and left padding, as our generation pads, with the unknown token (Llama 2 has no
  padding piece; its `<unk>` is id 0, which our batches and a reward model's `pad_token_id` pad
  with). No `tokenizer_class` is named: for `model_type` llama, transformers 5 then builds its
  `TokenizersBackend` from the SentencePiece model's own settings, and transformers 4 its
  `LlamaTokenizer`/`LlamaTokenizerFast`; both encode as SentencePiece does. Named, transformers 5's
  `LlamaTokenizer` would not (it drops the dummy-prefix space of a text that starts with
  whitespace), and transformers 4 knows no `TokenizersBackend`.
- `special_tokens_map.json`: the BOS, EOS, unknown and padding tokens, for tools that read only
  this file.
- `generation_config.json` (language models only; a reward model writes no text): the BOS, EOS and
  padding ids, and the chat and generate commands' sampling defaults, Meta's reference settings
  (temperature 0.6, top-p 0.9, no top-k: transformers' own default would keep only 50 candidates);
  `max_length` is the context, where transformers would otherwise stop at 20 tokens.

With these, `AutoTokenizer.from_pretrained(dir)(text)` gives `Tokenizer.encode(text, bos=True)`,
`apply_chat_template(dialog)` gives `chat.encode_dialog(...).tokens`, and greedy `generate` the
tokens our greedy `generate` does. Two differences stay, both transformers' reading of text: it
treats `<s>`, `</s>` and `<unk>` written in a text as those special tokens, and a literal `▁` as a
space (our `Tokenizer` encodes both as the characters they are).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from llama2_jax.checkpoint.load import TOKENIZER_FILE
from llama2_jax.model.config import LlamaConfig

if TYPE_CHECKING:
    from llama2_jax.data.tokenizer import Tokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# The Llama 2 chat format of llama2_jax/data/chat.py (Meta's `chat_completion`) in transformers'
# Jinja dialect, where `raise_exception`, `bos_token` and `eos_token` are given. It renders text,
# which transformers then tokenizes with BOS and EOS split out as special tokens: each turn's text
# is encoded on its own, as chat.py encodes it.
LLAMA2_CHAT_TEMPLATE = r"""
{#- A leading system message is folded into the first user message, as Meta's reference does. -#}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_prefix = '<<SYS>>\n' ~ messages[0]['content'] ~ '\n<</SYS>>\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{#- The checks of chat.validate_dialog, so a malformed dialog fails here as it does there. -#}
{%- if not turns -%}
    {{- raise_exception('the dialog has no user message; give at least one') -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set position = loop.index0 -%}
    {%- for tag in ['[INST]', '[/INST]', '<<SYS>>', '<</SYS>>'] if tag in message['content'] -%}
        {{- raise_exception('message ' ~ position ~ ' (' ~ message['role'] ~ ') contains the '
            ~ 'reserved chat tag ' ~ tag ~ '; remove it: it would forge a turn boundary') -}}
    {%- endfor -%}
{%- endfor -%}
{%- for message in turns -%}
    {%- set expected = loop.cycle('user', 'assistant') -%}
    {%- if message['role'] != expected -%}
        {{- raise_exception('message ' ~ (loop.index0 + messages | length - turns | length)
            ~ ': expected role ' ~ expected ~ ', got ' ~ message['role'] ~ '; a dialog is '
            ~ '[system], user, assistant, user, ... with a system message only in first place') -}}
    {%- endif -%}
    {#- Every user turn opens a new sequence with BOS; its text is stripped, the system prompt's
        inside it is not (the reference strips the merged message). -#}
    {%- if message['role'] == 'user' -%}
        {%- set content = (system_prefix if loop.first else '') ~ message['content'] -%}
        {{- bos_token ~ '[INST] ' ~ content | trim ~ ' [/INST]' -}}
    {%- else -%}
        {#- An answer closes its pair's sequence: a space, the stripped answer, a space, EOS. -#}
        {{- ' ' ~ message['content'] | trim ~ ' ' ~ eos_token -}}
    {%- endif -%}
{%- endfor -%}
{#- Nothing follows for add_generation_prompt: Llama 2 has no assistant header, and a dialog that
    ends with a user turn already ends with the `[/INST]` the answer follows. -#}
""".strip()

# Meta's reference sampling settings, which the chat and generate commands default to; top-k 0 turns
# off transformers' default of 50, which our sampling does not have.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 0}


def write_tokenizer_files(directory: str | os.PathLike, config: LlamaConfig, kind: str) -> None:
    """Write the files transformers reads with the `tokenizer.model` already in `directory`, an hf
    checkpoint of `config` holding a model of `kind` (`llama` or `reward`)."""
    # The data package brings grain along; importing it only here keeps the package light.
    from llama2_jax.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(os.path.join(directory, TOKENIZER_FILE))
    special_tokens = _special_tokens(tokenizer)
    _write_json(directory, SPECIAL_TOKENS_FILE, special_tokens)
    _write_json(
        directory,
        TOKENIZER_CONFIG_FILE,
        {
            **special_tokens,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.max_seq_len,
            "padding_side": "left",
            "chat_template": LLAMA2_CHAT_TEMPLATE,
        },
    )
    if kind == "llama":
        _write_json(
            directory,
            GENERATION_CONFIG_FILE,
            {
                "bos_token_id": tokenizer.bos_id,
                "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.unk_id,
                "max_length": config.max_seq_len,
                **SAMPLING_DEFAULTS,
            },
        )


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The tokenizer's own BOS, EOS and unknown pieces; `<unk>` doubles as the padding token."""
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise ValueError(
            f"tokenizer {tokenizer.path} has no BOS or EOS piece (bos_id {tokenizer.bos_id}, "
            f"eos_id {tokenizer.eos_id}), which the Llama 2 format needs; use a tokenizer trained "
            "with both, as `python -m llama2_jax tokenizer train` does"
        )
    unk = tokenizer.id_to_piece(tokenizer.unk_id)
    return {
        "bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
        "unk_token": unk,
        "pad_token": unk,
    }


def _write_json(directory: str | os.PathLike, name: str, value: dict) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")
