"""The loop engine: loops, turns, choices, events, the agent driver and sandboxes.

Nothing here knows about HTTP, Slack or Discord.
"""
