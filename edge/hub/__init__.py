"""The edge hub: the agent's WebSocket link to outpost-cloud (see ``edge.hub.client``)."""
