"""The edge↔cloud wire contract, sans-IO: frames (``events``), their bytes (``codec``),
per-direction sequencing (``window``) and the session state machine (``connection``).

The edge owns this contract so the edge binary is self-contained; the cloud imports it.
"""
