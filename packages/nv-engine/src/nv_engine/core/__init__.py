"""Scheduling and request state (no torch): the Scheduler and its per-step StepPlan, the
Sequence (one request), and the output stage (stop decisions, incremental detokenization)."""
