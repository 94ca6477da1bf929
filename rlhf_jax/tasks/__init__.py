"""Built-in tasks: offline worlds whose data the pipeline reads through the ordinary loaders."""
