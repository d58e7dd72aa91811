"""Evaluation: the field's metrics and the HTML report built on them."""
