"""Metering: prices, API keys with team budgets, and the SQLite usage ledger behind them."""
