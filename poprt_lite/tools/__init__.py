"""Tools that look at models rather than convert them: `diff` and `inspect`."""
