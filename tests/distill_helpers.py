"""Small settings for real distillation jobs in tests."""


def tiny_overrides(tmp_path, **extra) -> list[str]:
    base = {
        "storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "train.student_steps": 4,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.sample_every": 2,
        "train.batch_size_per_worker": 4,
        "cdm.n_max": 3,
        "eval.n_samples": 20,
        "eval.val_n_samples": 50,  # validation runs at every checkpoint; 500 samples cost ~5 s each on 2 cores
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def mlflow_client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def metric_steps(client, run_id, key="loss.ca") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))
