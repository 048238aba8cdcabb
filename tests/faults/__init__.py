"""Fault tests: each scenario runs bounded in time, most in a child process,
and fails with every thread's stack instead of hanging."""
