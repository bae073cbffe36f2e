"""Serving: a continuous-batching engine over decode slots (`engine`), the OpenAI-compatible HTTP server
on it (`server`), and the request shapes and checks they share (`protocol`)."""
