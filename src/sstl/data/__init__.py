"""Layer data: photo folders (scan, inventory, prepare), packed sets, near-duplicates, corruptions, augmentation."""
