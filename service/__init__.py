"""valley serving: loads exported ensembles and answers the Open Inference Protocol v2."""
