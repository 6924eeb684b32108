"""The planning service: the HTTP server (app, routes, schemas, errors, settings, engine,
batcher, sessions, codec, guard, metrics, openapi, server) and, in service.clients, the
programs that talk to it from outside. cli.py is the `worldplan` command over both."""
