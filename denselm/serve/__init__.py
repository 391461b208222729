"""`denselm serve`: an OpenAI-compatible embedding server with dynamic batching.

    DENSELM_API_KEY=... denselm serve --model out/model --port 8000
    curl -s localhost:8000/v1/embeddings -H "Authorization: Bearer $DENSELM_API_KEY" \
         -d '{"input": ["how do I sort a dict?"], "input_type": "query"}'

Modules: ``settings`` (every limit, one dataclass), ``protocol`` (request parsing and the
OpenAI response / error shapes), ``batcher`` (the model's one worker thread and its token-budget
queue), ``metrics`` (Prometheus), ``app`` (FastAPI routes, startup, uvicorn), ``command`` (the CLI).
FastAPI, uvicorn and prometheus-client come with ``pip install 'denselm[serve]'``.
"""

from .settings import ServeSettings

__all__ = ["ServeSettings"]
