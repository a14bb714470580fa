"""Evaluation of a language model: perplexity on held-out text, multiple-choice tasks scored by
log-likelihood (the protocol of HellaSwag / MMLU-style harnesses).

    likelihood.py       per-sequence log-likelihoods on the mesh, the core of both
    perplexity.py       documents -> BOS + tokens in consecutive windows -> perplexity
    multiple_choice.py  {"context", "choices", "answer"} lines -> accuracy and accuracy_norm
"""
