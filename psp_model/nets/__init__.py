"""Networks: the ViT MRI encoder with its SSL decoder, the guided cross-attention head, baselines."""
