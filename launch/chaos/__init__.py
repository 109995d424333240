"""Fault injection: fault plans, the injector in the ranks, the launcher's record of a faulted run, the report."""
