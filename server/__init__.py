"""psp-server: what the coordinator runs. Thin Flower ServerApp + CLI over psp_model."""
