"""Subcommands of the autobits CLI, one module per family (see autobits.app.cli.COMMAND_MODULES)."""
