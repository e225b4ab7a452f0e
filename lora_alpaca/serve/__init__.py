"""`generate.py --api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the base
model and its adapters, with dynamic batching, streaming and real logprobs."""
