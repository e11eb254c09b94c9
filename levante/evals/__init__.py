"""`levante eval`: the model card's benchmarks, measured against any OpenAI-compatible endpoint."""
