"""Operator tools: the commands behind `sydent-lite keys|associations|bind|import-sydent`."""
