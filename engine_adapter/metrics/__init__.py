from engine_adapter.metrics.scraper import EngineStats, parse_engine_metrics

__all__ = ["EngineStats", "parse_engine_metrics"]
