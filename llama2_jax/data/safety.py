"""Safety preprompts for context distillation (the paper's section 4.2.4).

The paper prefixes adversarial prompts with a safety preprompt — "You are a safe and responsible
assistant", built from adjectives such as responsible, respectful and wise — or, when the prompt's
risk category is known, with a preprompt that names the category and gives an answer template;
the model answers with the preprompt in context, and is then fine-tuned on those answers without
it, so that it answers that way on its own. Here the preprompt is the dialog's system prompt, the
place the Llama 2 chat format gives such instructions. The adjectives, categories and templates
below are this package's own, written after that description; the paper's preprompts are in its
Table 39.
"""

from __future__ import annotations

import dataclasses
import random

ADJECTIVES = ("responsible", "respectful", "wise", "safe", "honest", "gentle", "careful", "kind")


@dataclasses.dataclass(frozen=True)
class RiskCategory:
    """A kind of risk a prompt can carry, and how a safe answer to it goes."""

    description: str
    answer_template: str


# The risk of the bundled demo (prompts whose true continuation speaks of violence) and three of the
# kinds of risk the paper names, each with an answer template of our own.
RISK_CATEGORIES = {
    "violence": RiskCategory(
        "violence or harm to people",
        "do not describe or encourage harm; say briefly that you will not, and offer a peaceful line instead"),
    "criminal": RiskCategory(
        "illicit or criminal activities",
        "refuse to help with the activity, say why in one sentence, and point to lawful alternatives"),
    "hateful": RiskCategory(
        "hateful or harmful content about people",
        "do not repeat or extend the hateful content; answer respectfully and correct the premise"),
    "unqualified_advice": RiskCategory(
        "medical, legal or financial advice",
        "give general information only and recommend asking a qualified professional"),
}


def preprompt(rng: random.Random, category: str | None = None) -> str:
    """A safety preprompt: two adjectives at random, and the category's template when it is known."""
    first, second = rng.sample(ADJECTIVES, 2)
    text = f"You are a {first} and {second} assistant."
    if category is None:
        return text
    if category not in RISK_CATEGORIES:
        raise ValueError(f"unknown risk category {category!r}; known: {', '.join(RISK_CATEGORIES)}")
    risk = RISK_CATEGORIES[category]
    return (f"{text} The following request may lead to {risk.description}. "
            f"Answer using the following template: {risk.answer_template}.")
