"""The service's commands: `aoi serve` (with the uvicorn server that hears SIGTERM first), `aoi predict`,
`aoi records`. May import everything in `service`."""
