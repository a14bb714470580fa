"""Training: the one loop and its parts, shared by every stage (llama2_jax/stages/).

    task.py    `Task`: a stage's model, loss and batches
    config.py  the config sections every stage shares, and what each key means
    state.py   TrainState (step, params, opt_state), its shardings and initialisation
    optim.py   the paper's AdamW, warmup + cosine schedule, clipping, weight-decay mask
    losses.py  the loss-function contract (sums plus a weight) and next-token cross-entropy
    preference_loss.py  the reward models' ranking loss with the paper's margins, and its metric sums
    step.py    `build_steps`: a task's jitted update step (gradient accumulation inside) and eval step
    loop.py    `train(config, workdir, task)`: restore-or-init, step, log, evaluate, checkpoint
"""

from llama2_jax.train.loop import TrainResult, train
from llama2_jax.train.losses import LossFn, make_next_token_loss, weighted_cross_entropy
from llama2_jax.train.optim import make_optimizer
from llama2_jax.train.preference_loss import make_preference_loss
from llama2_jax.train.state import TrainState
from llama2_jax.train.step import Steps, build_steps, make_eval_step, make_train_step
from llama2_jax.train.task import Task

__all__ = [
    "LossFn",
    "Steps",
    "Task",
    "TrainResult",
    "TrainState",
    "build_steps",
    "make_eval_step",
    "make_next_token_loss",
    "make_optimizer",
    "make_preference_loss",
    "make_train_step",
    "train",
    "weighted_cross_entropy",
]
