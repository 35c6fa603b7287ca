"""Layer eval: metrics, health checks, the summary, the model card and prediction on photo files."""
