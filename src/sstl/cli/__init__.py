"""Layer cli: the `sstl` command line over the pipeline, DVC, MLflow and the servers it starts."""
