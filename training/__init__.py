"""valley training: base networks, Fast Geometric Ensembling and their evaluation."""
