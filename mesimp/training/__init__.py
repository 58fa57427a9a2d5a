"""The training loop (one for every task), its optimizers, resume and run safety."""
