"""Built-in experiments that measure the model's claims with the package's own training and evaluation."""
