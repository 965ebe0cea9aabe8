"""The serving core: ensembles loaded and run, dynamic batching, the plans that pick members, what a request
asks for, and the inference half of the data plane."""
