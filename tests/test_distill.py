"""Safety context distillation: answers written under a safety preprompt, kept without it, and only
those the safety reward model prefers to the unprompted answers."""

import json
import random

import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli
from llama2_jax.checkpoint.convert import export_model
from llama2_jax.commands import distill
from llama2_jax.data.safety import ADJECTIVES, RISK_CATEGORIES, preprompt
from llama2_jax.data.tokenizer import Tokenizer
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, LlamaRewardModel

TOKENIZER = Tokenizer()
PROMPTS = ["Continue this speech:\nO, I am slain!", "Who speaks this line?\nOut, damned spot!",
           "Continue this speech:\nIs this a dagger which I see before me,", "Which play is this from?\nAlas, poor Yorick!"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    config = LlamaConfig.from_preset("tiny", compute_dtype="float32")
    export_model(Llama(config, rngs=nnx.Rngs(0)), str(root / "policy"), "orbax", tokenizer_path=str(TOKENIZER.path))
    export_model(LlamaRewardModel(config, rngs=nnx.Rngs(1)), str(root / "safety"), "orbax",
                 tokenizer_path=str(TOKENIZER.path))
    return root


def test_preprompts_are_built_from_adjectives_and_the_risk_categorys_template():
    generic = preprompt(random.Random(0))
    assert generic.startswith("You are a ") and sum(adjective in generic for adjective in ADJECTIVES) == 2
    templated = preprompt(random.Random(0), "violence")
    assert templated.startswith(generic) and RISK_CATEGORIES["violence"].answer_template in templated
    with pytest.raises(ValueError, match="unknown risk category 'theft'"):
        preprompt(random.Random(0), "theft")


def test_answers_under_the_preprompt_are_kept_without_it_when_the_safety_model_prefers_them(
        checkpoints, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt, "category": "violence"}) + "\n" for prompt in PROMPTS))
    seen = []

    def answers(model, tokenizer, dialogs, **keywords):
        seen.append(dialogs)
        prompted = dialogs[0][0]["role"] == "system"
        return [f"{'gentle' if prompted else 'bloody'} answer {index}" for index in range(len(dialogs))]

    # The safety model prefers the preprompted answer for the first and third prompts only.
    scores = iter([np.array([0.9, 0.2, 0.8, 0.4]), np.array([0.5, 0.5, 0.5, 0.5])])
    monkeypatch.setattr(distill, "answer_dialogs", answers)
    monkeypatch.setattr("llama2_jax.reward.score", lambda *args, **keywords: next(scores))
    out = tmp_path / "distilled.jsonl"
    assert cli.main(["distill", "--checkpoint", str(checkpoints / "policy"), "--prompts", str(prompts),
                     "--out", str(out), "--safety-rm", str(checkpoints / "safety"), "--use-categories"]) == 0
    prompted, unprompted = seen
    assert all(dialog[0]["role"] == "system" and "violence" in dialog[0]["content"] for dialog in prompted)
    assert all(dialog[0]["role"] == "user" for dialog in unprompted)
    written = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert written == [[{"role": "user", "content": PROMPTS[index]},
                        {"role": "assistant", "content": f"gentle answer {index}"}] for index in (0, 2)]
    printed = capsys.readouterr().out.splitlines()
    # Each phase as it starts, then the count.
    assert printed[:3] == ["answering 4 prompts with a safety preprompt", "answering them without it, to compare",
                           f"scoring both answers with the safety reward model {checkpoints / 'safety'}"]
    assert printed[3].startswith("4 prompts answered with a safety preprompt, 2 scored safer")


def test_distilled_dialogs_from_a_real_policy_train_without_the_preprompt(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    out = tmp_path / "distilled.jsonl"
    assert cli.main(["distill", "--checkpoint", str(checkpoints / "policy"), "--prompts", str(prompts),
                     "--out", str(out), "--answer-tokens", "8"]) == 0
    from llama2_jax.data.records import parse_chat_record

    # Dialogs sft accepts, one per prompt in order (a policy's empty answer would be left out: eight
    # sampled tokens of a random model are all but never EOS or blank), none with the preprompt.
    dialogs = [parse_chat_record(json.loads(line))["messages"] for line in out.read_text().splitlines()]
    assert [[message["role"] for message in messages] for messages in dialogs] == [["user", "assistant"]] * 4
    assert [messages[0]["content"] for messages in dialogs] == PROMPTS
    assert all(messages[1]["content"].strip() for messages in dialogs)


def test_a_prompt_that_is_not_a_user_turn_is_one_clear_error(checkpoints, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert cli.main(["distill", "--checkpoint", str(checkpoints / "policy"), "--prompts", str(prompts),
                     "--out", str(tmp_path / "out.jsonl")]) == 1
    assert "prompts.jsonl:1: message 0: expected role 'user'" in capsys.readouterr().err
