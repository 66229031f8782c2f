"""The inspection service (torch-free). Its packages follow the request path by role; docs/architecture.md has the
map and the layering that `lint-imports` checks."""
