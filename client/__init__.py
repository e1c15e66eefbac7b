"""psp-client: what a hospital runs. Thin Flower ClientApp + CLI over psp_model."""
