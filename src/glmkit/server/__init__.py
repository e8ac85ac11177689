"""The HTTP server: OpenAI-compatible API (and, later, the web console) over one scheduler."""
