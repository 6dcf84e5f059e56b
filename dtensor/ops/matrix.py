"""Sharding rules for the matrix op family (see dtensor/dispatch.py for the rule/handler contract)."""

RULES: dict = {}
HANDLERS: dict = {}
