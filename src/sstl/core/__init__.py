"""Layer core: domain errors, atomic files, provenance, code deps and the environment record; imports no other layer."""
