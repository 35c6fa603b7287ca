"""Layer train: the training loop, its optimisers and schedules, bit-exact resume, the search and pretraining."""
