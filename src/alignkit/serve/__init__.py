"""The OpenAI-compatible server: batching engine, FastAPI app, web page, feedback store."""
