"""Layer pseudo: pseudo-label selection over the unlabelled pool, streamed, resumable, class-balanced."""
