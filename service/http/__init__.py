"""The HTTP face of the service: app factory, middleware, the one map from error types to status codes and JSON,
auth, dependencies, envelopes and one router per resource. The only package that imports FastAPI/Starlette;
nothing imports it but the CLI."""
