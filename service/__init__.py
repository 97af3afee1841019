"""The Lifeline dispatcher: config, fallback policy, NATS transport, telemetry, CLI."""

from service.config import Config, ConfigError, load_config, parse_config
from service.dispatcher import Dispatcher
from service.policy import ChainResult, Target, run_chain

__all__ = ["ChainResult", "Config", "ConfigError", "Dispatcher", "Target", "load_config", "parse_config", "run_chain"]
