"""Batch jobs: OpenAI Batch API files run offline through the server's own API layer, resumably."""
