"""jaxswap: Stochastic Weight Averaging in Parallel, and the trainer."""
