"""cdm_core: the torch-only maths of Continuous-Time Distribution Matching (CDM).

Flow conventions, schedules, backward simulation, losses, the training step, EMA, the few-step
sampler and the quality metrics. No Ray, MLflow, DeepSpeed or file I/O lives here (a test enforces
it): the `workflows`, `tuning` and `serving` packages wrap these functions.
"""

__version__ = "0.1.0"
