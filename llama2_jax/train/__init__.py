"""Training: the one loop and its parts, shared by pretraining, SFT and the reward models.

    state.py   TrainState (step, params, opt_state), its shardings and initialisation
    optim.py   the paper's AdamW, warmup + cosine schedule, clipping, weight-decay mask
    losses.py  the loss-function contract and next-token cross-entropy (vocab-parallel)
    step.py    the jitted update step (gradient accumulation inside) and the eval step
    loop.py    `train(config, workdir, task)`: restore-or-init, step, log, evaluate, checkpoint
    pretrain.py  the pretraining task and the `python -m llama2_jax train` command
"""

from llama2_jax.train.loop import Task, TrainResult, train
from llama2_jax.train.losses import LossFn, make_next_token_loss, weighted_cross_entropy
from llama2_jax.train.optim import make_optimizer
from llama2_jax.train.state import TrainState
from llama2_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "LossFn",
    "Task",
    "TrainResult",
    "TrainState",
    "make_eval_step",
    "make_next_token_loss",
    "make_optimizer",
    "make_train_step",
    "train",
    "weighted_cross_entropy",
]
