"""The jobs around cdm_core: config, CLI, teacher/evaluator training, evaluation, distillation."""
