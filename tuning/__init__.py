"""``cdm sweep``: Ray Tune sweeps of a distillation recipe over any config field (N_max, CFG scale,
learning rate, ...) with ASHA early stopping and MLflow lineage; entry point ``tuning.sweep.main``."""
