"""The `poprt-lite` command line: `main` dispatches subcommands; each lives in its own module."""
