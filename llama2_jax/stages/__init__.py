"""The stages of the recipe, one module each: its `Task` for the one training loop and its `run`.

    pretrain.py  next-token prediction on packed documents          (python -m llama2_jax train)
    sft.py       supervised fine-tuning on dialogs, answers only     (python -m llama2_jax sft)
    reward.py    reward models on preference pairs, ranking loss     (python -m llama2_jax reward)
    initial.py   how a fine-tuning stage starts from a checkpoint: its tokenizer, shape, weights

A stage module defines `STAGE` (the name its configs carry in `config.stage`), `CONFIG_DOCS` (what
its own config keys mean), `make_task(config, ...) -> Task` (cheap: no data or weights read, so
`aot` and `bench` can build any stage's step) and `run(config, workdir)`, what its command does.
"""
