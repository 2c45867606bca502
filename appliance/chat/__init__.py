"""The browser chat: `client` talks to the engine (images, streaming, reasoning), `service` runs a
turn (checks, history, waking the engine), `history` keeps conversations on disk."""
