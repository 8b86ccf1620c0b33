"""The OpenAI-compatible HTTP server (FastAPI) in front of ``AsyncLLMEngine``."""
