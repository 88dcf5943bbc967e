"""Drop-in torch.optim optimizers backed by fastopt kernels (imports torch; `import fastopt` does not)."""
