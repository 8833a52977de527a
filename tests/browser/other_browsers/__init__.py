"""Drivers for real Firefox and WebKit (see drivers.py)."""
