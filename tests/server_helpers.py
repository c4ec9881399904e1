"""A tiny elastic model with the demo tokenizer, served on 127.0.0.1 from a thread."""

from __future__ import annotations

import functools

from conftest import tiny_elastic

from star_elastic.data.tokenizer import build_tokenizer
from star_elastic.infer.budget import ElasticServer
from star_elastic.serve.app import BackgroundServer, ServeConfig, make_local_app

NAME = "tiny"
CONTEXT = 160


@functools.cache
def tiny_budget_server(seed: int = 3) -> ElasticServer:
    """Built once per test session (read-only: the server never writes weights)."""
    tok = build_tokenizer()
    elastic = tiny_elastic(seed=seed, vocab_size=len(tok), fit_steps=15)  # 3 distinct architectures  # every id decodes to text and back
    elastic.model.tokenizer = tok
    return ElasticServer.from_elastic(elastic)


def serve(server: ElasticServer, **cfg) -> BackgroundServer:
    app = make_local_app(server, ServeConfig(name=NAME, **cfg), max_context=CONTEXT)
    return BackgroundServer(app)


def scheduler_of(bg: BackgroundServer):
    return bg.app.state.engine.scheduler
