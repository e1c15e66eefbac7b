"""Local training loops (one site); the federation calls them."""
