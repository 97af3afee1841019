"""Worked examples of your own provider: a Python model class (echo_model.py) and a worker
in another language speaking the protocol directly (node/)."""
