"""Path simulators of the log-return x = ln(S_T / S_0), one module per process."""
