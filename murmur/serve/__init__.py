"""An OpenAI-compatible HTTP server whose concurrent requests share one engine, token by token."""
