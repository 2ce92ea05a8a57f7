"""Subcommands of the `synapse` command, one module each (HELP, add_arguments, run)."""
