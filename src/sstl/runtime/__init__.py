"""Layer runtime: the device and precision a stage computes with, and the torchrun process group."""
