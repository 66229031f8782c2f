"""The `aoi` command line: one console script whose subcommands live next to the code they drive."""
