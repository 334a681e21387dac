"""Shared check: a session's KV cache holds exactly the tokens it believes it fed."""

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache


def assert_cache_holds(model, session):
    """Every cached key equals a fresh forward pass over `session.fed`."""
    n = len(session.fed)
    assert session.cache[0].offset == n
    fresh = make_prompt_cache(model)
    model(mx.array(session.fed)[None], cache=fresh)
    for cached, reference in zip(session.cache, fresh):
        assert mx.allclose(cached.state[0][..., :n, :], reference.state[0][..., :n, :], atol=1e-4).item()
