"""Layer labelling: which photos to label next (the queue) and importing the labels given."""
