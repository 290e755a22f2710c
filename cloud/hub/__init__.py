"""The cloud hub: edge gateways' WebSocket sessions, their queues and their watermarks."""
