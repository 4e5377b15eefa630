"""Shared fixtures. The environment below is what ENVIRONMENT.md found to work on 2-core CPUs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def test_split():
    from workflows.fashion_mnist import load_split

    return load_split("test")


@pytest.fixture(scope="session")
def evaluator():
    from workflows.config import DEFAULT_EVALUATOR
    from workflows.evaluator import Evaluator

    return Evaluator.load(DEFAULT_EVALUATOR)


@pytest.fixture(scope="session")
def ray_cluster():
    """The one shared local Ray cluster of the test session."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def distill_env(tmp_path, monkeypatch):
    """A job sandbox: its own storage and sqlite MLflow store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path
