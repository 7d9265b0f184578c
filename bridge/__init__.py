"""The Loop API v1 in layers: `contract` (shared models), `client` (LoopClient),
`server` (HTTP over the engine), `cli` (the composition root), `standin` (the
scripted model for tests and the demo)."""
