"""Training and evaluation on a device mesh: one config-driven loop (fields: ``configs/base.py``).

    state, _ = train(config, workdir)                # --mode=train (resumes from workdir)
    results = evaluate_checkpoint(config, workdir)   # --mode=eval

Modules, in the order they build on each other: ``state`` (TrainState, schedule, optimizer),
``sharding`` (mesh, parameter shardings, host <-> global batches), ``config`` (the config checked
and turned into a ``Setup``), ``step`` (the jitted train step), ``checkpoints`` (orbax, config.json,
``init_from``), ``evaluate`` (multi-view eval), ``loop`` (``train``).

Batch-norm statistics are those of the global (micro-)batch; the step is jitted with the state
donated. A restart resumes from the latest checkpoint and continues the same data stream; SIGTERM
saves and exits cleanly.
"""

from dtf_jax.train.checkpoints import CheckpointError, checkpoint_manager, init_from, \
    load_init_arrays, restore_checkpoint, restore_latest, restore_step, save_checkpoint, \
    write_config
from dtf_jax.train.config import Setup, build_model, log, model_kwargs, setup, train_data, \
    validate_config
from dtf_jax.train.evaluate import evaluate, evaluate_checkpoint
from dtf_jax.train.loop import train
from dtf_jax.train.sharding import BATCH_AXES, host_local, make_mesh, param_spec, to_global
from dtf_jax.train.state import TrainState, lr_schedule, make_optimizer
from dtf_jax.train.step import NonFiniteLossError, cutmix_box, make_train_step, mix_batch
