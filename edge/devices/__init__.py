"""Field devices: Device and DeviceModel objects become twins polled by in-process drivers.

- ``model``: parse and check Device/DeviceModel bodies into a ``DeviceConfig`` (sans-IO).
- ``values``: registers, bits, bytes, JSON and twin text to typed values and back (sans-IO).
- ``twin``: one device's schedule, state, deadbands and desired values, in virtual time
  (sans-IO).
- ``drivers``: Modbus RTU/TCP, BLE and MQTT drivers and the shared buses they talk over.
- ``manager``: the trio shell running one task per device and reporting twins upstream.
- ``cli``: ``outpost device ls|get``.
"""
