"""Training: `Config` (config), the run in stages (run), schedules and loss (optim),
checkpoints and resume (checkpoint), strategies (distribute), multi-worker set-up and Keras fixes
(multi_worker), agreement across replicas (replicas)."""
