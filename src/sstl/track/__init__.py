"""Layer track: MLflow runs, the model registry and the served pyfunc model."""
