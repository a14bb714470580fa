"""Sampling from a policy and scoring what it wrote: what every stage that samples shares.

    prompts.py   the prompts a stage samples for, encoded and checked against the models' context
    sampler.py   the sampler that owns a policy's decoding copy: K answers per prompt, held-out answers
    engine.py    continuous batching: slots refilled with the next prompt as soon as an answer ends
    scoring.py   reward models and programs on token ids, the combined reward, policy, reference and
                 value terms by the training forward pass
    files.py     what a stage writes: JSONL records, the exported policy, rollout files
    on_policy.py the on-policy iterator: an iteration's rollout, its mini-batches, resume

Nothing here imports a stage: rejection sampling, PPO, GRPO, RLOO, REINFORCE++, GAtt's dialogs,
distillation, `compare`, `generate` and `chat` all sample through this package.
"""
