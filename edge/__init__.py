"""Outpost's edge appliance: hub client, store, pods, images, devices, upgrades and the CLI."""
