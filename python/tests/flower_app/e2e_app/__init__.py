"""End-to-end Flower app for safe-fedllm's deployment test."""
