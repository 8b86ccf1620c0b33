"""Flotilla's router: one OpenAI-compatible endpoint in front of every engine replica of every model.

No torch here (it runs in the operator's image). The modules, each owning one thing:

- ``chwbl``: consistent hashing with bounded loads, the replica choice (pure);
- ``prefix``: the routing key of a request, the start of its prompt (pure);
- ``backends``: which replicas serve which model, and how a model scaled to zero is woken;
- ``balancer``: in-flight counts, the engines' KV-cache use, replicas that failed, and the choice built from them;
- ``app``: the aiohttp proxy (auth, model lookup, holding for a scale from zero, streaming passthrough);
- ``metrics``: what the router exports;
- ``cli``: ``flotilla router``.
"""
