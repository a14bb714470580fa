"""The whole recipe in one command (`python -m llama2_jax pipeline`).

    steps.py   the stages in the paper's order: what each runs, on what, from which earlier stage
    run.py     runs them in one workdir, a subdirectory each, skipping finished ones and resuming
    report.py  the one table of every stage's measure and pipeline.png
"""
