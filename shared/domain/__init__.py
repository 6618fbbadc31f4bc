"""Domain: pure decisions (budgets, policy, node selection, node lifecycle, routing),
folds of events into state. No I/O; imports only the contracts."""
