"""Optional example: Safe-FedLLM with a tiny LLaMA in Flower."""
