"""Our own forward for each supported model family, reading the model's parameters in place."""
