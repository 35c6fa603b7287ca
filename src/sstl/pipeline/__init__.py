"""Layer pipeline: the stage scripts' bodies (stages/*.py call these) and their command-line paths."""
