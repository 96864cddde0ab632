"""TensorBoard views beyond the scalars: augmented batch, confusion matrix, mispredictions, graph, hparams."""
