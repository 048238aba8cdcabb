"""Fault tests: each scenario runs bounded in time, most in a child process,
and fails with every thread's stack instead of hanging.

``SHARDLOOP_FAULT_SCALE=10`` runs the heavy scenarios ten times larger (a
million calls in flight at shutdown instead of 100,000).
"""
