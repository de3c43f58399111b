"""Subcommands of the autobits CLI, one module per family (see autobits.cli.COMMAND_MODULES)."""
