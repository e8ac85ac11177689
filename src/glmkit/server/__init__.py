"""The HTTP server: the OpenAI-compatible API and the web console (conversations, their
workspaces and code), over one engine."""
