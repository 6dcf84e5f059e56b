"""Random ops on DTensors (handlers) (see dtensor/dispatch.py for the rule/handler contract)."""

RULES: dict = {}
HANDLERS: dict = {}
