"""Layer config: each params.yaml section's typed config class, a torch-free leaf (pydantic only)."""
