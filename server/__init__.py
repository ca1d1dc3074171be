"""OpenAI-compatible HTTP front end (aiohttp) over the engine's AsyncLLM."""
