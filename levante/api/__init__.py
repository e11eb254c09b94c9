"""The OpenAI-compatible HTTP server (`levante serve`)."""
