"""The small meta-training run most train tests start from (shared by test_train and
test_train_objectives; a plain module, like _train_subprocess, because it takes arguments)."""


def small_run_config(tiny_config, num_steps=4):
    """``tiny_config`` (modified in place and returned) as an intra Omniglot run of
    ``num_steps`` steps: 5-way tasks of 2 shots and 2 queries, 4 tasks per batch (one per fake
    device), 2 meta-val and 3 test tasks, evaluating and checkpointing every 2 steps."""
    c = tiny_config
    c.data.dataset = "omniglot"
    c.data.way = 5
    c.model.num_classes = 5
    c.data.shots = 2
    c.data.queries = 2
    c.data.tasks_per_batch = 4  # one task per fake device
    c.data.num_val_tasks = 2
    c.data.num_eval_tasks = 3
    c.data.predict_shots = 5
    c.train.num_steps = num_steps
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    return c
