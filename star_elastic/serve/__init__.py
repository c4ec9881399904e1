"""OpenAI-compatible HTTP serving of elastic budget control (scheduler, schemas, app, proxy)."""
