"""Layer models: backbones, the Classifier, the model factory and its weights, checkpoints and the inference loop."""
