"""Fault injection and the fault report."""
