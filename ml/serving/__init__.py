"""The serving runtime: loading, batching, the model process, the version pool, cache, rate
limits and the prediction log. ``bentos/sentiment`` wires it to HTTP; docs/serving.md explains it.
"""
