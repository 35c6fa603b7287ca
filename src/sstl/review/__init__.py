"""Layer review: a pull request's metrics, params and plots against a revision; the experiments table."""
