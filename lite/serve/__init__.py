"""`lite serve`: an OpenAI-compatible HTTP server with a prefix cache over MLA's latent cache.

`engine` (the generation worker), `prefix_cache` and `openai_shapes` need only the core install; `app` (the
Starlette app) needs the `serve` extra: `pip install -e ".[serve]"`.
"""

from lite.serve.engine import Engine
from lite.serve.jobs import Job
from lite.serve.prefix_cache import PrefixCache

__all__ = ["Engine", "Job", "PrefixCache"]
