"""Plotly HTML reports drawn from results rows (JSON Lines)."""
