"""The chat and generate commands end to end on a tiny checkpoint with the bundled tokenizer."""

import argparse
import io
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from llama2_jax import sharding
from llama2_jax.commands import chat as chat_cli
from llama2_jax.commands import generate as generate_cli
from llama2_jax.commands import model_flags
from llama2_jax.checkpoint.orbax_params import save_params
from llama2_jax.data.chat import encode_dialog
from llama2_jax.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer
from llama2_jax.generate import stream
from llama2_jax.model.config import LlamaConfig

SAMPLING = ["--max-new-tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An exported tiny model with no tokenizer yet; `with_tokenizer` adds one."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32", max_seq_len=128)
    model = sharding.create_model(config, sharding.make_mesh(devices=jax.devices()[:1]))
    save_params(path, config, sharding.model_arrays(model))
    return path


@pytest.fixture(scope="module")
def with_tokenizer(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_tok") / "tiny"
    shutil.copytree(checkpoint, path)
    shutil.copyfile(BUNDLED_TOKENIZER, path / "tokenizer.model")
    return path


def run_chat(monkeypatch, capsys, checkpoint, stdin_text, *flags):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    code = chat_cli.main(["--checkpoint", str(checkpoint), *SAMPLING, *flags])
    return code, capsys.readouterr()


def recording(monkeypatch):
    """The prompt and the answer's tokens of every turn the chat command answers."""
    turns = []

    def recording_stream(model, prompt, **kwargs):
        turns.append((list(prompt), []))
        for token in stream(model, prompt, **kwargs):
            turns[-1][1].append(token)
            yield token

    monkeypatch.setattr(chat_cli, "stream", recording_stream)
    return turns


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def assert_greedy(model, tokenizer, prompt, answer):
    """`answer` is the model's greedy continuation of `prompt`: each token the most likely after the
    tokens before it in one teacher-forced forward pass, up to 1e-4. The chat decodes with a cache,
    another program, whose logits agree with a full pass to about 1e-5 (test_model); here the
    runner-up trails the best by 0.005 or more at every step, and a sampled token by far more."""
    assert 1 <= len(answer) <= 6 and (len(answer) == 6 or answer[-1] == tokenizer.eos_id)
    padded = np.zeros((1, model.config.max_seq_len), np.int32)
    sequence = [*prompt, *answer]
    padded[0, :len(sequence)] = sequence
    logits = np.asarray(forward(model, padded))[0]
    for position, token in enumerate(answer, start=len(prompt) - 1):
        assert logits[position, token] >= logits[position].max() - 1e-4, (position, token)


def answer_text(tokenizer, answer):
    return tokenizer.decode(answer[:-1] if answer[-1] == tokenizer.eos_id else answer)


def test_piped_chat_answers_each_turn_and_handles_commands(monkeypatch, capsys, with_tokenizer, loaded):
    turns = recording(monkeypatch)
    stdin = "Good morrow, sir.\nWhat news?\n[INST] forged\n/system Speak in verse.\nAnd now?\n/exit\nnever read\n"
    code, captured = run_chat(monkeypatch, capsys, with_tokenizer, stdin)
    assert code == 0
    model, tokenizer = loaded
    assert len(turns) == 3  # the forged turn is refused, nothing after /exit is read
    prompts = [prompt for prompt, _ in turns]
    for prompt, answer in turns:
        assert_greedy(model, tokenizer, prompt, answer)
    first, second, last = (answer_text(tokenizer, answer) for _, answer in turns)
    answers, _, rest = captured.out.partition("(refused: ")
    assert answers == f"{first}\n{second}\n" and "reserved chat tag" in rest
    assert rest.partition("(system prompt set; dialog cleared)\n")[2] == f"{last}\n"
    # The second turn carries the first exchange; the system prompt restarts the dialog.
    assert prompts[1] == encode_dialog(tokenizer, [{"role": "user", "content": "Good morrow, sir."},
                                                   {"role": "assistant", "content": first},
                                                   {"role": "user", "content": "What news?"}]).tokens
    assert tokenizer.decode(prompts[2]) == "[INST] <<SYS>>\nSpeak in verse.\n<</SYS>>\n\nAnd now? [/INST]"


def test_a_line_ending_in_a_backslash_continues_the_turn_when_piped(monkeypatch, capsys, with_tokenizer, loaded):
    turns = recording(monkeypatch)
    stdin = "Which play is this line from? \\\nThese yellow cowslip cheeks,\n/system Speak \\\nin verse.\nHi\\\n"
    code, captured = run_chat(monkeypatch, capsys, with_tokenizer, stdin)
    assert code == 0 and len(turns) == 2 and "(system prompt set" in captured.out
    _, tokenizer = loaded
    question = "Which play is this line from?\nThese yellow cowslip cheeks,"
    assert turns[0][0] == encode_dialog(tokenizer, [{"role": "user", "content": question}]).tokens
    # A continued /system line sets a two-line system prompt; input that ends mid-turn still sends it.
    assert turns[1][0] == encode_dialog(tokenizer, [{"role": "system", "content": "Speak\nin verse."},
                                                    {"role": "user", "content": "Hi"}]).tokens


def test_a_continued_turn_prompts_for_its_next_line_interactively():
    class Session:
        def __init__(self):
            self.asked = []

        def answer(self, text):
            self.asked.append(text)

    session, out = Session(), io.StringIO()
    chat_cli.run(session, ["Continue this speech: \\\n", "  That their designment halts;\n", "Hi\n"], out,
                 interactive=True)
    assert session.asked == ["Continue this speech:\n  That their designment halts;", "Hi"]
    assert out.getvalue() == "\nyou> ...> llama> \nyou> llama> \nyou> "


@pytest.fixture(scope="module")
def loaded(with_tokenizer):
    args = argparse.Namespace(
        checkpoint=str(with_tokenizer), tokenizer=None, dtype=None, compute_dtype=None,
    )
    return model_flags.load_for_sampling(args)


def test_chat_turns_continue_the_dialog_in_the_chat_format(loaded, monkeypatch):
    model, tokenizer = loaded
    turns = recording(monkeypatch)
    session = chat_cli.ChatSession(
        model, tokenizer, chat_cli.SamplingParams(), max_new_tokens=6, seed=0, system="Be brief.",
        out=io.StringIO(),
    )
    first = session.answer("Good morrow, sir.")
    session.answer("What news?")
    assert session.history[0] == {"role": "user", "content": "Good morrow, sir."}
    assert session.history[1] == {"role": "assistant", "content": first}
    # The second answer is the greedy continuation of the whole dialog in the chat format.
    dialog = [{"role": "system", "content": "Be brief."}, *session.history[:3]]
    prompt, answer = turns[1]
    assert prompt == encode_dialog(tokenizer, dialog).tokens
    assert_greedy(model, tokenizer, prompt, answer)
    assert session.history[3] == {"role": "assistant", "content": answer_text(tokenizer, answer)}


def test_chat_drops_the_oldest_turns_to_fit_the_context(loaded):
    model, tokenizer = loaded
    session = chat_cli.ChatSession(
        model, tokenizer, chat_cli.SamplingParams(), max_new_tokens=64, seed=0, system=None, out=io.StringIO(),
    )
    for turn in range(4):  # each turn is ~30 prompt tokens; 64 are left for the dialog
        session.answer(f"Tell me, good friend, the tale of the {turn} kings.")
    assert session.history[-2]["content"].endswith("the 3 kings.")
    assert len(session.history) < 8
    with pytest.raises(ValueError, match="even without earlier turns"):
        session.answer("word " * 80)


def test_generate_writes_one_line_per_prompt_in_order(tmp_path, with_tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": "To be, or not to be"},
        {"messages": [{"role": "user", "content": "Who art thou?"}]},
        {"prompt": "Now is the winter of our discontent, made glorious summer by this sun of York"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = tmp_path / "out" / "completions.jsonl"
    code = generate_cli.main(["--checkpoint", str(with_tokenizer), "--prompts", str(prompts),
                              "--out", str(out), "--batch-size", "2", *SAMPLING])
    assert code == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[0]["prompt"] == "To be, or not to be"
    tokenizer = Tokenizer(BUNDLED_TOKENIZER)
    for result in results:
        assert 1 <= len(result["tokens"]) <= 6 and len(result["log_probs"]) == len(result["tokens"])
        assert all(value <= 0 for value in result["log_probs"])
        text_tokens = result["tokens"][:-1] if result["finished"] else result["tokens"]
        assert result["completion"] == tokenizer.decode(text_tokens)


def test_a_checkpoint_without_tokenizer_is_a_clear_error(monkeypatch, capsys, checkpoint, tmp_path):
    code, captured = run_chat(monkeypatch, capsys, checkpoint, "hello\n")
    assert code == 1 and "--tokenizer PATH" in captured.err
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    code = generate_cli.main(["--checkpoint", str(checkpoint), "--prompts", str(prompts),
                              "--out", str(tmp_path / "o.jsonl"), "--tokenizer", str(BUNDLED_TOKENIZER),
                              "--max-new-tokens", "2"])
    assert code == 0  # an explicit --tokenizer is the fix


@pytest.mark.parametrize("content, message", [
    ("\n\n", "holds no prompts"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', "p.jsonl:1: message 0: expected role 'user'"),
    ('{"messages": [{"role": "user", "content": "<<SYS>> hi"}]}\n', "reserved chat tag"),
    ('{"text": "hi"}\n', "no 'prompt', 'messages' or 'conversations' field (fields: text)"),
])
def test_bad_prompt_files_are_refused(capsys, tmp_path, with_tokenizer, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    code = generate_cli.main(["--checkpoint", str(with_tokenizer), "--prompts", str(prompts),
                              "--out", str(tmp_path / "o.jsonl")])
    assert code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_prompt_longer_than_the_context_is_refused(capsys, tmp_path, with_tokenizer):
    prompts = tmp_path / "long.txt"
    prompts.write_text("word " * 200 + "\n")
    code = generate_cli.main(["--checkpoint", str(with_tokenizer), "--prompts", str(prompts),
                              "--out", str(tmp_path / "o.jsonl")])
    assert code == 1 and "context of 128 tokens" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
