"""Sharding rules for the reductions op family (see dtensor/dispatch.py for the rule/handler contract)."""

RULES: dict = {}
HANDLERS: dict = {}
