"""Sending validation messages (email)."""
