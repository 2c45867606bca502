"""A fleet of Stations behind vLLM's router (docs/fleet.md).

`members`: who is in the fleet (settings `fleet.members`) and the fleet key (a private file).
`router`: `Fleet`, which starts and supervises `vllm-router` on loopback and tells the gateway
where to send a request and whether a presented key is the fleet's.
"""
