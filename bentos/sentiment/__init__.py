"""The sentiment service: ``bentoml serve bentos.sentiment.service:SentimentService``."""
