"""What a command does end to end: open a run directory, train its jobs, write its results and report."""
