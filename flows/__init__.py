"""capfilt flows: Prefect flows that run the DVC stages, track them in MLflow and promote models."""
